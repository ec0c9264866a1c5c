import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:http";
import type { IncomingMessage, ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { stringify } from "yaml";
import { describe, expect, it } from "vitest";
import { ADMIN_TOKEN, TEST_POLICY, httpCheck } from "../harness/keygate.js";
import { embeddedEnv, spawnKeygate } from "../harness/process.js";

// README (Tracing): "SIGTERM sends the last ones before the process exits (after the listeners
// drain, for at most 5 s)". A collector that takes the export request and never answers (an
// overloaded collector, a black-holed network path) must not hold the exit longer than that.
describe("tracing shutdown with a collector that never answers", () => {
  it("SIGTERM gives up on the last spans after the documented 5 s, not the exporter's 10 s", async () => {
    const held: ServerResponse[] = [];
    let exportsSeen = 0;
    const collector = createServer((req: IncomingMessage, res: ServerResponse) => {
      exportsSeen += 1;
      req.resume();
      held.push(res); // never answered
    });
    await new Promise<void>((resolve) => collector.listen(0, "127.0.0.1", resolve));
    const port = (collector.address() as AddressInfo).port;
    const dataDir = mkdtempSync(join(tmpdir(), "keygate-telemetry-"));
    const policyPath = join(dataDir, "policy.yaml");
    writeFileSync(policyPath, stringify(TEST_POLICY));
    const kg = await spawnKeygate({
      cwd: dataDir,
      env: embeddedEnv({
        dataDir,
        policyFile: policyPath,
        adminToken: ADMIN_TOKEN,
        extra: {
          OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: `http://127.0.0.1:${port}/v1/traces`,
          OTEL_EXPORTER_OTLP_PROTOCOL: "http/json",
          // Only the shutdown flush sends the batch.
          OTEL_BSP_SCHEDULE_DELAY: "60000",
        },
      }),
    });
    try {
      const tp = `00-${randomBytes(16).toString("hex")}-${randomBytes(8).toString("hex")}-01`;
      const res = await httpCheck(kg.ports.http, "/check/v1/things", { traceparent: tp });
      expect(res.status).toBe(401);
      kg.child.kill("SIGTERM");
      await kg.exit;
      expect(exportsSeen).toBeGreaterThan(0);
      // The flush gave up at its bound (5 s) and said so; the exporter's own timeout (10 s by
      // default) was not waited for. The process then stopped as usual.
      const lines = kg.stdout().split("\n").filter((line) => line.startsWith("{")).map((line) => String((JSON.parse(line) as { msg?: unknown }).msg));
      expect(lines).toContain("the last trace spans were not sent within 5000 ms of the shutdown; they are dropped");
      expect(lines).toContain("keygate stopped");
    } finally {
      await kg.stop("SIGKILL");
      for (const res of held) res.destroy();
      collector.closeAllConnections();
      await new Promise<void>((resolve) => collector.close(() => resolve()));
      rmSync(dataDir, { recursive: true, force: true });
    }
  }, 90_000);
});
