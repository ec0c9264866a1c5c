import mongoose from "mongoose";
import { KeyFormat } from "../src/keys/key-format.js";
import { KeyHasher } from "../src/keys/hasher.js";
import { newKeyId } from "../src/keys/ids.js";
import { keyDocument } from "../src/store/mongo.js";
import type { SqliteKeyStore } from "../src/store/sqlite.js";
import { newKeyRecord } from "../src/store/store.js";
import type { AccountDefaults, CreateLimits, KeyRecord, KeyStore } from "../src/store/store.js";
import { METERED_PLAN, UNLIMITED_PLAN } from "./policy.js";

/** Keys are issued with keygate's default product prefix. */
export const KEY_PREFIX = "kg";

const DEFAULTS: AccountDefaults = { plan: UNLIMITED_PLAN, subscriptionStatus: "active", role: "standard" };
const KEY_CHUNK = 5000;
const REVOKE_REASON = "bench: revoked before start";

/** How many keys and accounts to seed, and how they split between the plans. */
export interface SeedPlan {
  keys: number;
  accounts: number;
  /** Share of accounts on the metered plan (the mixed scenario's keys). */
  meteredShare: number;
  /** Share of all keys revoked before keygate starts (taken from metered accounts). */
  revokedShare: number;
}

/** The secrets of the seeded keys, by role in the scenarios. They only ever go into data files. */
export interface SeededKeys {
  /** Valid keys of unlimited-plan accounts: hot. */
  unlimited: string[];
  /** Valid keys of metered-plan accounts: mixed. */
  metered: string[];
  /** Revoked keys: mixed. */
  revoked: string[];
  /** Every seeded key in creation order, valid and revoked. */
  all: string[];
}

/** What seeding took. */
export interface SeedTiming {
  keys: number;
  accounts: number;
  seconds: number;
  keysPerSecond: number;
  method: string;
}

/** An account to write. */
export interface PlannedAccount {
  ownerId: string;
  plan: string;
}

/** Writes planned accounts and keys into one kind of store. */
export interface SeedWriter {
  readonly method: string;
  writeAccounts(accounts: readonly PlannedAccount[], nowMs: number): Promise<void>;
  writeKeys(records: readonly KeyRecord[]): Promise<void>;
  revoke(keys: readonly KeyRecord[], nowMs: number): Promise<void>;
  close(): Promise<void>;
}

/** Owner id of account `index`. */
export function ownerId(index: number): string {
  return `bench_${index.toString().padStart(7, "0")}`;
}

/** The largest number of keys any one account gets when `keys` are spread over `accounts`. */
export function keysPerAccount(keys: number, accounts: number): number {
  return Math.ceil(keys / accounts);
}

function firstMeteredAccount(plan: SeedPlan): number {
  return Math.floor(plan.accounts * (1 - plan.meteredShare));
}

/** The accounts of a plan: the last `meteredShare` of them are on the metered plan. */
export function plannedAccounts(plan: SeedPlan): PlannedAccount[] {
  const firstMetered = firstMeteredAccount(plan);
  return Array.from({ length: plan.accounts }, (_, i) => ({ ownerId: ownerId(i), plan: i >= firstMetered ? METERED_PLAN : UNLIMITED_PLAN }));
}

/** Builds keys the way keygate's CreateKey does: only the peppered hash goes into the record. */
class KeyFactory {
  readonly #format = new KeyFormat(KEY_PREFIX);
  readonly #hasher: KeyHasher;
  readonly #nowMs = Date.now();

  constructor(pepper: string) {
    this.#hasher = new KeyHasher(pepper);
  }

  make(owner: string): { record: KeyRecord; secret: string } {
    const secret = this.#format.generate("live");
    const parsed = this.#format.parse(secret);
    if (parsed === null) throw new Error("a generated key failed its own checksum");
    const record = newKeyRecord({
      id: newKeyId(),
      hash: this.#hasher.hash(secret),
      ownerId: owner,
      name: "bench",
      mode: parsed.mode,
      start: parsed.start,
      last4: parsed.last4,
      scopes: ["read"],
      createdAtMs: this.#nowMs,
    });
    return { record, secret };
  }
}

/** Keys made for a plan, not yet written anywhere: the same set is written to every store. */
export interface PlannedKeys {
  plan: SeedPlan;
  accounts: PlannedAccount[];
  records: KeyRecord[];
  /** The records to revoke after writing. */
  revoked: KeyRecord[];
  secrets: SeededKeys;
}

/**
 * Makes the accounts and keys of `plan` and picks the slice to revoke. Key j belongs to account
 * j mod accounts, so consecutive keys spread over accounts.
 */
export function planKeys(plan: SeedPlan, pepper: string): PlannedKeys {
  const factory = new KeyFactory(pepper);
  const records: KeyRecord[] = [];
  const all: string[] = [];
  for (let j = 0; j < plan.keys; j++) {
    const { record, secret } = factory.make(ownerId(j % plan.accounts));
    records.push(record);
    all.push(secret);
  }
  const firstMetered = firstMeteredAccount(plan);
  const isMetered = (j: number): boolean => j % plan.accounts >= firstMetered;
  const revokedIndexes = pickRevoked(plan, all.map((_, j) => j).filter(isMetered));
  const secrets: SeededKeys = { unlimited: [], metered: [], revoked: [], all };
  all.forEach((secret, j) => {
    if (revokedIndexes.has(j)) secrets.revoked.push(secret);
    else if (isMetered(j)) secrets.metered.push(secret);
    else secrets.unlimited.push(secret);
  });
  return { plan, accounts: plannedAccounts(plan), records, revoked: records.filter((_, j) => revokedIndexes.has(j)), secrets };
}

/** Spreads `revokedShare` of all keys evenly over the metered ones. */
function pickRevoked(plan: SeedPlan, meteredIndexes: number[]): Set<number> {
  const count = Math.min(meteredIndexes.length, Math.max(1, Math.round(plan.keys * plan.revokedShare)));
  const stride = Math.max(1, Math.floor(meteredIndexes.length / Math.max(1, count)));
  const revoked = new Set<number>();
  for (let k = 0; k < meteredIndexes.length && revoked.size < count; k += stride) {
    const j = meteredIndexes[k];
    if (j !== undefined) revoked.add(j);
  }
  return revoked;
}

/** Writes planned accounts and keys through `writer`, then revokes the planned slice. */
export async function writeSeed(writer: SeedWriter, planned: PlannedKeys): Promise<SeedTiming> {
  const startedAt = performance.now();
  await writer.writeAccounts(planned.accounts, Date.now());
  for (let start = 0; start < planned.records.length; start += KEY_CHUNK) await writer.writeKeys(planned.records.slice(start, start + KEY_CHUNK));
  await writer.revoke(planned.revoked, Date.now());
  const seconds = (performance.now() - startedAt) / 1000;
  const keys = planned.records.length;
  return { keys, accounts: planned.accounts.length, seconds, keysPerSecond: keys / Math.max(seconds, 1e-9), method: writer.method };
}

/**
 * Adds keys, secrets discarded, until the store holds `total` (the memory scenario's 1,000,000),
 * spread over the existing accounts after the `existing` ones.
 */
export async function seedFiller(writer: SeedWriter, existing: number, total: number, accounts: number, pepper: string): Promise<SeedTiming> {
  const startedAt = performance.now();
  const factory = new KeyFactory(pepper);
  const count = Math.max(0, total - existing);
  for (let start = 0; start < count; start += KEY_CHUNK) {
    const chunk: KeyRecord[] = [];
    for (let i = start; i < Math.min(count, start + KEY_CHUNK); i++) chunk.push(factory.make(ownerId((existing + i) % accounts)).record);
    await writer.writeKeys(chunk);
  }
  const seconds = (performance.now() - startedAt) / 1000;
  return { keys: count, accounts, seconds, keysPerSecond: count / Math.max(seconds, 1e-9), method: writer.method };
}

/** Seeds through the KeyStore API itself (upsertAccount, createKey): the SQLite path, about 10k keys/s. */
export function storeWriter(store: KeyStore, maxActiveKeys: number): SeedWriter {
  return {
    method: `${store.kind}: KeyStore.upsertAccount + KeyStore.createKey per key`,
    async writeAccounts(accounts, nowMs) {
      for (const a of accounts) await store.upsertAccount({ ownerId: a.ownerId, plan: a.plan, subscriptionStatus: "active", role: "standard" }, DEFAULTS, nowMs);
    },
    async writeKeys(records) {
      const limits: CreateLimits = { maxActiveKeysFor: () => maxActiveKeys, accountDefaults: DEFAULTS, nowMs: Date.now() };
      for (const record of records) await store.createKey(record, limits);
    },
    async revoke(keys, nowMs) {
      for (const key of keys) {
        if ((await store.revokeKey(key.id, nowMs, REVOKE_REASON)) === null) throw new Error(`could not revoke seeded key ${key.id}`);
      }
    },
    close: async () => undefined,
  };
}

/**
 * Adds keys to an embedded store in one SQLite transaction per chunk (SqliteKeyStore.importKeys):
 * the memory scenario's filler, where a transaction per key would take minutes for 1,000,000.
 */
export function sqliteImportWriter(store: SqliteKeyStore, maxActiveKeys: number): SeedWriter {
  return {
    ...storeWriter(store, maxActiveKeys),
    method: "sqlite: SqliteKeyStore.importKeys, one transaction per chunk",
    async writeKeys(records) {
      store.importKeys(records);
    },
  };
}

/**
 * Seeds MongoDB with bulk inserts of the documents MongoKeyStore writes (the shape of its
 * toDoc and account upsert). MongoKeyStore.createKey costs five round trips and a scan on
 * mongo-java-server (about 450 keys/s), which would take minutes for 100,000 keys. The shape
 * is checked by reading keys back through MongoKeyStore (verifyMongoSeed).
 */
export async function mongoBulkWriter(uri: string): Promise<SeedWriter> {
  const client = new mongoose.mongo.MongoClient(uri, { serverSelectionTimeoutMS: 5000 });
  await client.connect();
  const db = client.db();
  return {
    method: "mongodb: bulk insertMany of MongoKeyStore's document shape, checked by reading back through MongoKeyStore",
    async writeAccounts(accounts, nowMs) {
      const at = new Date(nowMs);
      const docs = accounts.map((a) => ({
        _id: a.ownerId,
        plan: a.plan,
        subscription_status: "active",
        role: "standard",
        active_key_count: 0,
        created_at: at,
        updated_at: at,
        credit_period: "",
        monthly_used: 0,
        topup_balance: 0,
      }));
      for (let i = 0; i < docs.length; i += KEY_CHUNK) await db.collection<{ _id: string }>("accounts").insertMany(docs.slice(i, i + KEY_CHUNK), { ordered: false });
    },
    async writeKeys(records) {
      await db.collection<{ _id: string }>("keys").insertMany(records.map((record) => keyDocument(record, true)), { ordered: false });
      // Every seeded key holds a slot of its account, as createKey would have counted it.
      const perOwner = new Map<string, number>();
      for (const r of records) perOwner.set(r.ownerId, (perOwner.get(r.ownerId) ?? 0) + 1);
      const updates = [...perOwner].map(([owner, n]) => ({ updateOne: { filter: { _id: owner }, update: { $inc: { active_key_count: n } } } }));
      await db.collection<{ _id: string }>("accounts").bulkWrite(updates, { ordered: false });
    },
    async revoke(keys, nowMs) {
      // What MongoKeyStore.revokeKey does, for all at once: its per-key filters scan on mongo-java-server.
      await db.collection<{ _id: string }>("keys").updateMany(
        { _id: { $in: keys.map((k) => k.id) } },
        { $set: { revoked_at: new Date(nowMs), revoke_reason: REVOKE_REASON, counted: false } },
      );
      const perOwner = new Map<string, number>();
      for (const k of keys) perOwner.set(k.ownerId, (perOwner.get(k.ownerId) ?? 0) + 1);
      const updates = [...perOwner].map(([owner, n]) => ({ updateOne: { filter: { _id: owner }, update: { $inc: { active_key_count: -n } } } }));
      if (updates.length > 0) await db.collection<{ _id: string }>("accounts").bulkWrite(updates, { ordered: false });
    },
    close: () => client.close(),
  };
}


/**
 * Reads one key of each kind back through the store, as a Check would, so that a seeded shape
 * which drifted from the store's own fails the run instead of skewing it.
 */
export async function verifySeed(store: KeyStore, keys: SeededKeys, pepper: string): Promise<void> {
  const hasher = new KeyHasher(pepper);
  const expectations: Array<[string | undefined, string, boolean]> = [
    [keys.unlimited[0], UNLIMITED_PLAN, false],
    [keys.metered[0], METERED_PLAN, false],
    [keys.revoked[0], METERED_PLAN, true],
  ];
  for (const [secret, plan, revoked] of expectations) {
    if (secret === undefined) continue;
    const snapshot = await store.findSnapshotByHash(hasher.hash(secret));
    if (snapshot === null) throw new Error(`a seeded key is not found by its hash in the ${store.kind} store`);
    const ok = snapshot.account.plan === plan && snapshot.account.subscriptionStatus === "active" && (snapshot.key.revokedAtMs !== null) === revoked;
    if (!ok) throw new Error(`a seeded key reads back wrong from the ${store.kind} store: plan ${snapshot.account.plan}, revoked ${String(snapshot.key.revokedAtMs)}`);
  }
}
