import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import { status as GrpcStatus } from "@grpc/grpc-js";
import type { ServiceError } from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { checkInit, httpCheck, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { requireServer } from "../harness/ports.js";
import { firingAfter20m, promtool, seriesFromScrapes } from "../harness/promtool.js";

// The KeygateCheckErrors alert selects keygate_checks_total{decision="error", reason!="UNAVAILABLE"},
// and its runbook says a Check that ends in INTERNAL is a defect, logged at level 50 with the
// request id. Every failure to decide used to be counted UNAVAILABLE, so the alert could never
// fire. A defect (here a stored value keygate never writes, StoredValueError) is still answered
// UNAVAILABLE (fail closed), but counted INTERNAL; an outage stays UNAVAILABLE
// (test/e2e/check-budget.test.ts, test/unit/metrics-counts.test.ts).

const alertReady = requireServer("promtool", promtool !== undefined, "apt-get install prometheus");

function checkErrors(metrics: string): string[] {
  return metrics.split("\n").filter((line) => line.startsWith("keygate_checks_total{") && line.includes('decision="error"'));
}

describe("a Check keygate fails to decide from a defect", () => {
  let kg: TestKeygate;
  beforeAll(async () => {
    kg = await startKeygate({ httpAuthzProxy: "nginx", env: { KEYGATE_ACCESS_LOG_SAMPLE: "1" } });
  });
  afterAll(async () => {
    await kg?.stop();
  });

  it("is answered UNAVAILABLE on both ports, counted reason=INTERNAL, logged at level 50 with its request id", async () => {
    const created = await kg.admin.createKey({ ownerId: "defect-counted", name: "k", scopes: ["tutor"] });
    const id = created.key?.id ?? "";
    const db = new DatabaseSync(join(kg.dataDir, "keygate.db"));
    try {
      db.prepare("UPDATE keys SET scopes = ? WHERE id = ?").run('"read"', id);
    } finally {
      db.close();
    }
    const scrape = async (): Promise<string> => (await fetch(`http://127.0.0.1:${kg.ports.admin}/metrics`)).text();
    const defectChecks = async (round: number): Promise<Array<number | string>> => {
      const grpc = await kg.check(checkInit({ "x-api-key": created.secret }, "/v1/things")).then(
        () => "answered",
        (error: unknown) => (error as ServiceError).code,
      );
      const http = await httpCheck(kg.ports.http, "/check", { "x-original-uri": "/v1/things", "x-original-method": "GET", "x-api-key": created.secret, "x-request-id": `defect-http-${round}` });
      return [grpc, http.status];
    };
    expect(checkErrors(await scrape())).toEqual([]);
    expect(await defectChecks(1)).toEqual([GrpcStatus.UNAVAILABLE, 503]);
    const before = await scrape();
    const startedAt = performance.now();
    expect(await defectChecks(2)).toEqual([GrpcStatus.UNAVAILABLE, 503]);
    const after = await scrape();
    expect(checkErrors(before).sort()).toEqual(['keygate_checks_total{decision="error",reason="INTERNAL",mode="grpc"} 1', 'keygate_checks_total{decision="error",reason="INTERNAL",mode="http"} 1']);
    expect(checkErrors(after).sort()).toEqual(['keygate_checks_total{decision="error",reason="INTERNAL",mode="grpc"} 2', 'keygate_checks_total{decision="error",reason="INTERNAL",mode="http"} 2']);
    const logged = kg.logLines
      .map((line) => JSON.parse(line) as { level?: number; msg?: string; requestId?: string })
      .filter((line) => line.msg === "check could not be decided")
      .map((line) => [line.level, line.requestId]);
    // The gRPC Check's id is Envoy's (attributes.request.http.id), as checkInit sets it.
    expect(logged).toEqual([
      [50, "req-1"],
      [50, "defect-http-1"],
      [50, "req-1"],
      [50, "defect-http-2"],
    ]);
    const access = kg.logLines
      .map((line) => JSON.parse(line) as { msg?: string; entry?: string; reason?: string; code?: string; status?: number })
      .filter((line) => line.msg === "access")
      .map((line) => [line.entry, line.reason, line.code, line.status]);
    expect(access).toEqual([
      ["grpc", "INTERNAL", "UNAVAILABLE", 503],
      ["http", "INTERNAL", "UNAVAILABLE", 503],
      ["grpc", "INTERNAL", "UNAVAILABLE", 503],
      ["http", "INTERNAL", "UNAVAILABLE", 503],
    ]);
    expect(kg.logLines.join("").includes(created.secret.slice(12))).toBe(false);
    if (!alertReady) return;
    const seconds = Math.max(1, (performance.now() - startedAt) / 1000);
    const firing = firingAfter20m(seriesFromScrapes(before, after, seconds), 'alertname="KeygateCheckErrors"', [
      { alertname: "KeygateCheckErrors", severity: "warning", namespace: "keygate", job: "keygate-admin" },
    ]);
    expect(firing.output).toContain("SUCCESS");
  });
});
