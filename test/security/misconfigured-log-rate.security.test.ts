import { describe, expect, it } from "vitest";
import { KeyFormat } from "../../src/keys/key-format.js";
import { TEST_POLICY, checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";

// The error line for bad per-route settings is written once a minute, not once a Check: the routes
// step runs after only the key's shape check (a public CRC32), so anyone can send such Checks, by a
// mistyped route setting or, with an Envoy prefix route that is not segment-aware, on purpose.
// keygate_checks_total counts every one.
const N = 300;

function errorLines(lines: string[], msg: string): number {
  return lines.filter((l) => l.includes(msg) && (JSON.parse(l) as { level: number }).level >= 50).length;
}

describe("ROUTE_MISCONFIGURED error log under an anonymous flood", () => {
  it("a flood of forged-key Checks does not write one error line per request", async () => {
    const kg = await startKeygate({ policy: { ...TEST_POLICY, routes: [...TEST_POLICY.routes, { method: "*", pathPrefix: "/projects/{project}/jobs" }] } });
    try {
      const format = new KeyFormat("kg");
      const outcomes = new Map<string, number>();
      const count = (o: { status: number; code: string | null }) => outcomes.set(`${o.status}:${o.code}`, (outcomes.get(`${o.status}:${o.code}`) ?? 0) + 1);
      // (a) a quota typo on one route; (b) the client-chosen project next to a prefix route.
      for (let i = 0; i < N; i++) {
        const forged = format.generate("live"); // well-formed, never issued
        count(checkOutcome(await kg.check(checkInit({ authorization: `Bearer ${forged}` }, "/v1/things", "GET", { quota: "imagez" }))));
        count(checkOutcome(await kg.check(checkInit({ "x-api-key": forged }, `/projects/proj_a${i}/jobs`, "GET", { project_id: "proj_a" }))));
      }
      const metrics = await (await fetch(`http://127.0.0.1:${kg.ports.admin}/metrics`)).text();
      const counted = /keygate_checks_total\{decision="deny",reason="ROUTE_MISCONFIGURED",mode="grpc"\} (\d+)/.exec(metrics)?.[1];
      const logged = errorLines(kg.logLines, "bad per-route settings from the proxy");
      const bytes = kg.logLines.filter((l) => l.includes("bad per-route settings")).reduce((s, l) => s + Buffer.byteLength(l), 0);
      console.log("observed", JSON.stringify({ outcomes: Object.fromEntries(outcomes), counted, errorLines: logged, errorBytes: bytes }));
      expect(Object.fromEntries(outcomes)).toEqual({ "500:ROUTE_MISCONFIGURED": 2 * N });
      // Bounded: a handful per distinct setting, not 2 * N.
      expect(logged).toBeLessThanOrEqual(10);
    } finally {
      await kg.stop();
    }
  }, 120_000);
});
