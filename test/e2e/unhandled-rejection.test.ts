import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { ADMIN_TOKEN } from "../harness/keygate.js";
import { builtCli } from "../harness/built-cli.js";
import { until } from "../harness/poll.js";
import { embeddedEnv, spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";

const dirs: string[] = [];
const running: KeygateProcess[] = [];
afterAll(async () => {
  await Promise.all(running.map((p) => p.stop("SIGKILL")));
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

/**
 * A module node loads before keygate (`--import`): on SIGUSR2 it rejects a promise nobody
 * handles, as a library's internal promise can (ioredis's reconnect flush has been seen to).
 */
const REJECT_ON_SIGUSR2 = `process.on("SIGUSR2", () => { void Promise.reject(new Error("a rejection no one handles")); });\n`;

async function counted(adminPort: number): Promise<string | null> {
  const text = await (await fetch(`http://127.0.0.1:${adminPort}/metrics`, { headers: { authorization: `Bearer ${ADMIN_TOKEN}` } })).text();
  return /^keygate_unhandled_rejections_total (\d+)$/m.exec(text)?.[1] ?? null;
}

describe("a promise rejected with no handler", () => {
  it("is logged and counted, and keygate serve keeps answering instead of exiting", async () => {
    const dir = mkdtempSync(join(tmpdir(), "keygate-rejection-"));
    dirs.push(dir);
    const preload = join(dir, "reject-on-sigusr2.mjs");
    writeFileSync(preload, REJECT_ON_SIGUSR2);
    const keygate = await spawnKeygate({
      cwd: dir,
      env: embeddedEnv({ dataDir: join(dir, "data"), adminToken: ADMIN_TOKEN, extra: { KEYGATE_LOG_LEVEL: "info" } }),
      args: ["--import", preload, builtCli(), "serve"],
      allowUnhandledRejections: true,
    });
    running.push(keygate);
    expect(await counted(keygate.ports.admin)).toBe("0");

    for (const n of [1, 2]) {
      keygate.child.kill("SIGUSR2");
      await until(() => keygate.stdout().split('"unhandled promise rejection"').length - 1 === n || keygate.child.exitCode !== null, 20_000, `log line ${n} for the rejection`);
      expect(keygate.child.exitCode).toBe(null);
    }
    const line = keygate.stdout().split("\n").find((l) => l.includes('"unhandled promise rejection"')) ?? "";
    expect(JSON.parse(line)).toMatchObject({ level: 50, err: { message: "a rejection no one handles" } });
    expect(await counted(keygate.ports.admin)).toBe("2");

    // Still serving: a Check without a credential is refused as it always is.
    const refused = await fetch(`http://127.0.0.1:${keygate.ports.http}/check/v1/things`);
    expect(refused.status).toBe(401);
    expect(await keygate.stop("SIGTERM")).toBe(0);
  });
});
