import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { create, toJson } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { sizeDelimitedEncode } from "@bufbuild/protobuf/wire";
import { CheckRequestSchema } from "../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import type { CheckRequest } from "../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { KeyFormat } from "../src/keys/key-format.js";
import { KEY_PREFIX } from "./seed.js";
import type { SeededKeys } from "./seed.js";

/**
 * How ghz gets its requests. "binary": size-delimited CheckRequests (ghz -B), decoded once when
 * ghz starts. "json": a JSON array (ghz -D), which ghz converts entry by entry on first use, so a
 * run over distinct keys (cold) also pays that conversion in the load generator.
 */
export type DataFormat = "binary" | "json";

/** A file of CheckRequests that ghz sends round-robin: request i carries entry i mod entries. */
export interface DataFile {
  path: string;
  entries: number;
  format: DataFormat;
  /** What the entries are, by kind, e.g. { valid: 950, malformed: 30, … }. */
  composition: Record<string, number>;
}

/** One credential to send, tagged with what it is. */
interface Credential {
  kind: "valid" | "malformed" | "unknown" | "revoked";
  value: string;
}

const BASE_TIME_MS = Date.UTC(2026, 0, 1);

/** A CheckRequest shaped like Envoy's: the request line, its usual headers, and the API key. */
export function checkRequest(key: string, i: number): CheckRequest {
  const path = `/v1/things/${i % 1000}`;
  const requestId = `bench-${i.toString(16).padStart(8, "0")}-4d1c-8a3e-5f2b9c0d7e61`;
  return create(CheckRequestSchema, {
    attributes: {
      request: {
        time: timestampFromMs(BASE_TIME_MS + i),
        http: {
          id: String(1_000_000_000 + i),
          method: "GET",
          path,
          host: "api.example.com",
          scheme: "https",
          protocol: "HTTP/1.1",
          headers: {
            ":authority": "api.example.com",
            ":method": "GET",
            ":path": path,
            ":scheme": "https",
            accept: "application/json",
            "accept-encoding": "gzip, br",
            "user-agent": "bench-client/1.0 (keygate bench)",
            "x-forwarded-proto": "https",
            "x-request-id": requestId,
            authorization: `Bearer ${key}`,
          },
        },
      },
    },
  });
}

/** Writes `credentials` as a ghz data file named `name` in `dir`. */
function writeDataFile(dir: string, name: string, credentials: readonly Credential[], format: DataFormat): DataFile {
  const composition: Record<string, number> = {};
  for (const c of credentials) composition[c.kind] = (composition[c.kind] ?? 0) + 1;
  const path = join(dir, `${name}.${format === "binary" ? "bin" : "json"}`);
  if (format === "binary") {
    writeFileSync(path, Buffer.concat(credentials.map((c, i) => sizeDelimitedEncode(CheckRequestSchema, checkRequest(c.value, i)))));
  } else {
    writeFileSync(path, JSON.stringify(credentials.map((c, i) => toJson(CheckRequestSchema, checkRequest(c.value, i)))));
  }
  return { path, entries: credentials.length, format, composition };
}

/** A small deterministic PRNG (mulberry32), so data files are the same from run to run. */
function prng(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function shuffle<T>(items: T[], seed: number): T[] {
  const random = prng(seed);
  for (let i = items.length - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    const a = items[i];
    const b = items[j];
    if (a === undefined || b === undefined) continue;
    items[i] = b;
    items[j] = a;
  }
  return items;
}

/**
 * A key that fails the shape or checksum test, in the ways real traffic does: a typo in the
 * checksum, another product's prefix, a truncated paste, a character outside base62, a token
 * of another kind.
 */
export function malformedKey(valid: string, variant: number): string {
  switch (variant % 5) {
    case 0: {
      const last = valid.at(-1) === "A" ? "B" : "A";
      return valid.slice(0, -1) + last;
    }
    case 1:
      return `sk${valid.slice(2)}`;
    case 2:
      return valid.slice(0, -5);
    case 3:
      return `${valid.slice(0, 12)}-${valid.slice(13)}`;
    default:
      return "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJiZW5jaCJ9.c2lnbmF0dXJlLW5vdC1hLWtleQ";
  }
}

/** Well-formed keys with a valid checksum that were never stored. */
export function unknownKeys(count: number): string[] {
  const format = new KeyFormat(KEY_PREFIX);
  return Array.from({ length: count }, () => format.generate("live"));
}

function cycle(pool: readonly string[], count: number, kind: Credential["kind"]): Credential[] {
  if (pool.length === 0) throw new Error(`no ${kind} keys to build a data file from`);
  return Array.from({ length: count }, (_, i) => ({ kind, value: pool[i % pool.length] ?? "" }));
}

function malformed(pool: readonly string[], count: number): Credential[] {
  return cycle(pool, count, "malformed").map((c, i) => ({ kind: "malformed", value: malformedKey(c.value, i) }));
}

/** Sizes of the generated data files. */
export interface DataSizes {
  /** Distinct keys in the hot set (at most the unlimited-plan keys). */
  hotKeys: number;
  mixedEntries: number;
  floodEntries: number;
}

/** Valid keys a cold run's warm-up sends before it is measured (none of them in the cold data file). */
export const COLD_WARM_KEYS = 1000;

/** The data file of every scenario. */
export interface ScenarioData {
  /** Every valid key once (both plans), interleaved, but coldWarm's: cold runs take the first n, all distinct. */
  cold: DataFile;
  /** Valid keys kept out of `cold` (its last ones): a cold run's warm-up takes the allow path with them. */
  coldWarm: DataFile;
  /** Valid unlimited-plan keys, the first `hotKeys` of them: hot. */
  hot: DataFile;
  mixed: DataFile;
  flood: DataFile;
  floodMalformed: DataFile;
  /** Every seeded key once (valid and revoked): the memory scenario touches the first n. */
  touch: DataFile;
}

/** Writes the data files of all scenarios into `dir`. */
export function writeScenarioData(dir: string, keys: SeededKeys, sizes: DataSizes, format: DataFormat): ScenarioData {
  const revoked = new Set(keys.revoked);
  const valid = keys.all.filter((k) => !revoked.has(k));
  // A cold run never meets these: at most COLD_WARM_KEYS, and a small share of a small store.
  const warmKeys = Math.min(COLD_WARM_KEYS, Math.floor(valid.length / 20));
  const coldKeys = valid.slice(0, valid.length - warmKeys);
  const m = sizes.mixedEntries;
  const mixedMalformed = Math.round(m * 0.03);
  const mixedUnknown = Math.round(m * 0.01);
  const mixedRevoked = Math.round(m * 0.01);
  const mixed = shuffle(
    [
      ...cycle(keys.metered, m - mixedMalformed - mixedUnknown - mixedRevoked, "valid"),
      ...malformed(keys.metered, mixedMalformed),
      ...cycle(unknownKeys(mixedUnknown), mixedUnknown, "unknown"),
      ...cycle(keys.revoked, mixedRevoked, "revoked"),
    ],
    6,
  );
  const f = sizes.floodEntries;
  const flood = shuffle([...malformed(keys.unlimited, Math.floor(f / 2)), ...cycle(unknownKeys(f - Math.floor(f / 2)), f - Math.floor(f / 2), "unknown")], 7);
  return {
    cold: writeDataFile(dir, "cold", cycle(coldKeys, coldKeys.length, "valid"), format),
    coldWarm: writeDataFile(dir, "cold-warm", cycle(valid.slice(coldKeys.length), warmKeys, "valid"), format),
    hot: writeDataFile(dir, "hot", cycle(keys.unlimited.slice(0, sizes.hotKeys), Math.min(sizes.hotKeys, keys.unlimited.length), "valid"), format),
    mixed: writeDataFile(dir, "mixed", mixed, format),
    flood: writeDataFile(dir, "flood", flood, format),
    floodMalformed: writeDataFile(dir, "flood-malformed", malformed(keys.unlimited, f), format),
    touch: writeDataFile(dir, "touch", keys.all.map((value) => ({ kind: revoked.has(value) ? "revoked" : "valid", value })), format),
  };
}
