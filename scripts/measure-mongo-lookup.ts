// Measures what a cold key lookup (MongoKeyStore.findSnapshotByHash, the read a Check makes when
// no cache holds the key) costs keygate, against the harness's MongoDB-wire server
// (mongo-java-server, installed by .ci/install-mongo-wire.sh). Not part of `npm test`.
//   npx tsx scripts/measure-mongo-lookup.ts [--lookups 5000] [--warmup 500] [--owners 100] [--filler 0]
// Prints one JSON line per figure:
//  - cpu: keygate's CPU (process.cpuUsage: user + system, every thread of this process; the
//    server is another process) per lookup, over --lookups sequential lookups of distinct keys,
//    after --warmup lookups of other keys; command monitoring is off for it. Beside it, the
//    server's CPU per lookup (its /proc stat, 10 ms ticks), with --filler more keys in the
//    collection that are never looked up, to show how the server's cost grows with the store;
//  - round-trips: commands the driver sent per lookup (its command monitoring), for a known key
//    and for an unknown hash.
import { randomBytes } from "node:crypto";
import { readFileSync, readdirSync } from "node:fs";
import { Command } from "commander";
import mongoose from "mongoose";
import { z } from "zod";
import { MongoKeyStore } from "../src/store/mongo.js";
import { startMongoWire } from "../test/harness/mongo-wire.js";

const options = z
  .object({
    lookups: z.coerce.number().int().positive(),
    warmup: z.coerce.number().int().nonnegative(),
    owners: z.coerce.number().int().positive(),
    filler: z.coerce.number().int().nonnegative(),
  })
  .parse(
    new Command()
      .option("--lookups <n>", "measured lookups, each of a different key", "5000")
      .option("--warmup <n>", "lookups of other keys before measuring", "500")
      .option("--owners <n>", "accounts the keys are spread over", "100")
      .option("--filler <n>", "more keys in the store, never looked up", "0")
      .parse()
      .opts(),
  );

const ROUND_TRIP_SAMPLE = 50;

function print(line: Record<string, unknown>): void {
  process.stdout.write(`${JSON.stringify(line)}\n`);
}

const TICKS_PER_SECOND = 100;

/** CPU microseconds (user + system) that process `pid` has used, from /proc (Linux). */
function processCpuMicros(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return ((Number(fields[11]) + Number(fields[12])) * 1_000_000) / TICKS_PER_SECOND;
}

/** The MongoDB-wire server: the java child of this process, or null when it runs elsewhere. */
function serverPid(): number | null {
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, "utf8");
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      if (ppid === process.pid && readFileSync(`/proc/${entry}/cmdline`, "utf8").includes("MongoWireServer")) return Number(entry);
    } catch {
      // The process ended while /proc was read.
    }
  }
  return null;
}

const ownerOf = (index: number): string => `measure-owner-${index % options.owners}`;

/** Accounts and keys in the shape MongoKeyStore writes them (its upsert and its toDoc). */
async function seed(uri: string, hashes: readonly string[]): Promise<void> {
  const client = new mongoose.mongo.MongoClient(uri, { serverSelectionTimeoutMS: 5000 });
  await client.connect();
  try {
    const db = client.db();
    const at = new Date();
    const accounts = Array.from({ length: options.owners }, (_, i) => ({
      _id: ownerOf(i),
      plan: "pro",
      subscription_status: "active",
      role: "standard",
      active_key_count: 0,
      created_at: at,
      updated_at: at,
      credit_period: "",
      monthly_used: 0,
      topup_balance: 0,
      topup_total: 0,
    }));
    await db.collection<{ _id: string }>("accounts").insertMany(accounts, { ordered: false });
    const keys = hashes.map((hash, i) => ({
      _id: `key_measure_${String(i).padStart(8, "0")}`,
      hash,
      owner_id: ownerOf(i),
      project_id: null,
      name: `measure ${i}`,
      mode: "live",
      start: "kg_live_abcd",
      last4: "wxyz",
      scopes: ["read", "write"],
      metadata: { team: "core" },
      created_at: at,
      last_used_at: null,
      expires_at: null,
      revoked_at: null,
      revoke_reason: null,
      grace_ends_at: null,
      rotated_to_id: null,
      rate_limit: null,
      counted: true,
    }));
    // Inserted in random order, so the looked-up keys lie anywhere among the filler, as in a real store.
    for (let i = keys.length - 1; i > 0; i--) {
      const j = Math.floor(Math.random() * (i + 1));
      const swap = keys[i];
      const other = keys[j];
      if (swap === undefined || other === undefined) continue;
      keys[i] = other;
      keys[j] = swap;
    }
    for (let i = 0; i < keys.length; i += 1000) await db.collection<{ _id: string }>("keys").insertMany(keys.slice(i, i + 1000), { ordered: false });
  } finally {
    await client.close();
  }
}

async function lookUpAll(store: MongoKeyStore, hashes: readonly string[]): Promise<void> {
  for (const hash of hashes) {
    const snapshot = await store.findSnapshotByHash(hash);
    if (snapshot === null || snapshot.key.hash !== hash || snapshot.account.plan !== "pro") throw new Error("a seeded key did not read back whole");
  }
}

const server = await startMongoWire();
try {
  const total = options.warmup + options.lookups + ROUND_TRIP_SAMPLE + options.filler;
  const hashes = Array.from({ length: total }, () => randomBytes(32).toString("hex"));
  await seed(server.uri, hashes);
  const warmup = hashes.slice(0, options.warmup);
  const measured = hashes.slice(options.warmup, options.warmup + options.lookups);
  const sample = hashes.slice(options.warmup + options.lookups, options.warmup + options.lookups + ROUND_TRIP_SAMPLE);

  const store = await MongoKeyStore.connect(server.uri);
  try {
    await lookUpAll(store, warmup);
    const pid = serverPid();
    const serverBefore = pid === null ? 0 : processCpuMicros(pid);
    const before = process.cpuUsage();
    await lookUpAll(store, measured);
    const used = process.cpuUsage(before);
    const serverUsed = pid === null ? null : processCpuMicros(pid) - serverBefore;
    const perLookup = (micros: number): number => Math.round((micros / options.lookups) * 10) / 10;
    print({
      figure: "cpu",
      server: server.kind,
      node: process.version,
      lookups: options.lookups,
      warmup: options.warmup,
      keysInStore: total,
      cpuUsPerLookup: perLookup(used.user + used.system),
      userUsPerLookup: perLookup(used.user),
      systemUsPerLookup: perLookup(used.system),
      serverCpuUsPerLookup: serverUsed === null ? null : perLookup(serverUsed),
    });
  } finally {
    await store.close();
  }

  let commands: string[] = [];
  const monitored = await MongoKeyStore.connect(server.uri, { onCommandStarted: (event) => commands.push(event.commandName) });
  try {
    commands = [];
    await lookUpAll(monitored, sample);
    const known = commands;
    commands = [];
    for (let i = 0; i < ROUND_TRIP_SAMPLE; i++) {
      if ((await monitored.findSnapshotByHash(randomBytes(32).toString("hex"))) !== null) throw new Error("an unknown hash was found");
    }
    const unknown = commands;
    const byName = (names: readonly string[]): Record<string, number> => {
      const counts: Record<string, number> = {};
      for (const name of names) counts[name] = (counts[name] ?? 0) + 1;
      return counts;
    };
    print({
      figure: "round-trips",
      lookups: ROUND_TRIP_SAMPLE,
      knownKeyPerLookup: known.length / ROUND_TRIP_SAMPLE,
      unknownHashPerLookup: unknown.length / ROUND_TRIP_SAMPLE,
      knownKeyCommands: byName(known),
      unknownHashCommands: byName(unknown),
    });
  } finally {
    await monitored.close();
  }
} finally {
  await server.stop();
}
