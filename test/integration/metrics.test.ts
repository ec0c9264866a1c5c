import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { KeyFormat } from "../../src/keys/key-format.js";
import { checkInit, httpCheck, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

let kg: TestKeygate;
beforeAll(async () => {
  kg = await startKeygate();
});
afterAll(async () => {
  await kg.stop();
});

/** The value of one sample line, e.g. `keygate_checks_total{decision="allow",reason="OK",mode="grpc"}`. */
function sample(text: string, name: string, labels: Record<string, string>): number | undefined {
  for (const line of text.split("\n")) {
    if (!line.startsWith(`${name}{`) && !line.startsWith(`${name} `)) continue;
    const [series, value] = line.split(" ");
    if (series === undefined || value === undefined) continue;
    const ok = Object.entries(labels).every(([k, v]) => series.includes(`${k}="${v}"`));
    if (ok) return Number(value);
  }
  return undefined;
}

describe("/metrics", () => {
  it("counts known traffic by decision, reason and mode, with durations, cache results and queues", async () => {
    const created = await kg.admin.createKey({ ownerId: "metrics-owner", name: "m", scopes: ["tutor"] });
    const auth = { authorization: `Bearer ${created.secret}` };
    for (let i = 0; i < 3; i++) expect((await kg.check(checkInit(auth))).status?.code).toBe(0);
    for (let i = 0; i < 2; i++) expect((await kg.check(checkInit({}))).status?.code).toBe(16);
    expect((await httpCheck(kg.ports.http, "/check/v1/decks", auth)).status).toBe(403);
    const unknown = new KeyFormat("kg").generate("live");
    expect((await httpCheck(kg.ports.http, "/check", { "x-api-key": unknown })).status).toBe(401);
    expect((await httpCheck(kg.ports.http, "/check", { "x-api-key": unknown })).status).toBe(401);

    const res = await fetch(`http://127.0.0.1:${kg.ports.admin}/metrics`);
    expect(res.status).toBe(200);
    const text = await res.text();
    expect(sample(text, "keygate_checks_total", { decision: "allow", reason: "OK", mode: "grpc" })).toBe(3);
    expect(sample(text, "keygate_checks_total", { decision: "deny", reason: "MISSING_CREDENTIAL", mode: "grpc" })).toBe(2);
    expect(sample(text, "keygate_checks_total", { decision: "deny", reason: "MISSING_SCOPE", mode: "http" })).toBe(1);
    expect(sample(text, "keygate_checks_total", { decision: "deny", reason: "UNKNOWN_KEY", mode: "http" })).toBe(2);
    expect(sample(text, "keygate_check_duration_seconds_count", { mode: "grpc" })).toBe(5);
    expect(sample(text, "keygate_check_duration_seconds_count", { mode: "http" })).toBe(3);
    expect(sample(text, "keygate_check_duration_seconds_bucket", { mode: "grpc", le: "0.0001" })).toBeGreaterThanOrEqual(0);
    // The first check of each key misses L1 and reads the store; the rest hit (or hit the negative cache).
    expect(sample(text, "keygate_cache_lookups_total", { layer: "l1", result: "miss" })).toBe(2);
    expect(sample(text, "keygate_cache_lookups_total", { layer: "l1", result: "hit" })).toBe(3);
    expect(sample(text, "keygate_cache_lookups_total", { layer: "l1", result: "negative" })).toBe(1);
    expect(sample(text, "keygate_backend_duration_seconds_count", { backend: "store", op: "find_snapshot" })).toBe(2);
    expect(sample(text, "keygate_write_behind_pending", { queue: "last_used" })).toBe(1);
    expect(sample(text, "keygate_write_behind_pending", { queue: "usage" })).toBe(2);
    expect(text).not.toContain(created.secret);
  });
});
