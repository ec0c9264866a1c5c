import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { findJemalloc } from "../../src/server/allocator.js";
import { httpCheck, postJson } from "../harness/keygate.js";
import { embeddedEnv, spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";
import { requireServer } from "../harness/ports.js";

// keygate's "keygate listening" line names the malloc the process runs on, read from its own
// memory map: the image preloads jemalloc (deploy/Dockerfile), and an operator can see whether
// the preload took. A real keygate, started with and without LD_PRELOAD; on jemalloc it also
// serves an allow and a denial, as the image's keygate does.

const linux = process.platform === "linux";
if (!linux) console.warn(`allocator: SKIPPED, the memory map is read from Linux's /proc (this is ${process.platform})`);
const jemalloc = linux ? findJemalloc() : null;
const withJemalloc = linux && requireServer("jemalloc (libjemalloc2)", jemalloc !== null, "apt-get install libjemalloc2");

const ADMIN_TOKEN = "allocator-admin-token-0123456789abcdef";
const running: KeygateProcess[] = [];
const dirs: string[] = [];
afterAll(async () => {
  await Promise.all(running.map((p) => p.stop("SIGKILL")));
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

/**
 * The "keygate listening" line of a keygate started with `preload` (LD_PRELOAD) or without,
 * after `use` has had the running process.
 */
async function listeningLine(preload: string | null, use: (keygate: KeygateProcess) => Promise<void> = async () => {}): Promise<Record<string, unknown>> {
  const dataDir = mkdtempSync(join(tmpdir(), "keygate-allocator-"));
  dirs.push(dataDir);
  const env = embeddedEnv({ dataDir, adminToken: ADMIN_TOKEN });
  // The harness passes the test runner's own variables on; LD_PRELOAD is set or cleared here.
  const keygate = await spawnKeygate({ cwd: dataDir, env: { ...env, LD_PRELOAD: preload ?? "" } });
  running.push(keygate);
  await use(keygate);
  const line = keygate
    .stdout()
    .split("\n")
    .filter((l) => l.startsWith("{"))
    .map((l) => JSON.parse(l) as Record<string, unknown>)
    .find((l) => l["msg"] === "keygate listening");
  expect(await keygate.stop()).toBe(0);
  return line ?? {};
}

describe.runIf(linux)("the malloc keygate reports at start", () => {
  it("is the system's without a preload", async () => {
    expect((await listeningLine(null))["allocator"]).toBe("system");
  });

  it.runIf(withJemalloc)("is jemalloc with LD_PRELOAD naming libjemalloc, as the image starts it, and that keygate serves", async () => {
    const line = await listeningLine(jemalloc, async (keygate) => {
      const created = await postJson(keygate.ports.admin, "CreateKey", { ownerId: "on-jemalloc", name: "k" }, ADMIN_TOKEN);
      expect(created.status).toBe(200);
      const secret = String(created.json["secret"]);
      const allowed = await httpCheck(keygate.ports.http, "/check/v1/things", { "x-api-key": secret });
      expect(allowed.status).toBe(200);
      expect(allowed.headers.get("x-keygate-owner-id")).toBe("on-jemalloc");
      const denied = await httpCheck(keygate.ports.http, "/check/v1/things", { "x-api-key": `${secret.slice(0, -1)}${secret.endsWith("A") ? "B" : "A"}` });
      expect(denied.status).toBe(401);
    });
    expect(line["allocator"]).toBe("jemalloc");
  });
});
