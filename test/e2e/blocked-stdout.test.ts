import { Agent, request } from "node:http";
import { describe, expect, it } from "vitest";
import { z } from "zod";
import { STDOUT_LOG_MAX_BYTES } from "../../src/server/logger.js";
import { ADMIN_TOKEN } from "../harness/keygate.js";
import { until } from "../harness/poll.js";
import { embeddedEnv, spawnKeygate, spawnedKeygates } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";

// `keygate serve` with a stdout nobody reads (a stuck log shipper, a container runtime whose log
// pipe is full). pino's default destination kept every line waiting for stdout, without bound (a
// replica killed for its memory in the end), and at exit its hook flushSync()ed them, retrying
// EAGAIN every 100 ms for as long as nobody read: SIGTERM drained, then the process never exited.
// Now at most STDOUT_LOG_MAX_BYTES wait; later lines are dropped, counted
// (keygate_log_lines_dropped_total) and reported in one line once stdout is read again, and an
// exit waits at most 2 s for stdout.

const spawned = spawnedKeygates("kg-blocked-stdout-");

/** A path whose access-log line carries the 1,024 characters pathOnly keeps: about 1.3 KB a line. */
const LONG_PATH = `/check/v1/${"a".repeat(1100)}`;
/** How an access line for LONG_PATH starts its path (the HTTP mode's /check prefix is not in it). */
const LONG_PATH_LOGGED = `/v1/${"a".repeat(100)}`;

/** The message of the line that reports dropped log lines. */
const DROPPED_MSG = "log lines dropped: stdout was not read while maxBytes of log waited for it";

/** Sends `count` Checks (no credential: 401) over four keep-alive connections; resolves with the status counts. */
async function sendChecks(port: number, count: number, path = LONG_PATH): Promise<Record<string, number>> {
  const agent = new Agent({ keepAlive: true, maxSockets: 4 });
  const codes: Record<string, number> = {};
  let next = 0;
  const one = (): Promise<void> =>
    new Promise((done) => {
      const req = request({ host: "127.0.0.1", port, path, agent, timeout: 10_000 }, (res) => {
        res.resume();
        res.on("end", () => {
          codes[String(res.statusCode)] = (codes[String(res.statusCode)] ?? 0) + 1;
          done();
        });
      });
      req.on("timeout", () => req.destroy(new Error("timeout")));
      req.on("error", (error: NodeJS.ErrnoException) => {
        codes[error.code ?? error.message] = (codes[error.code ?? error.message] ?? 0) + 1;
        done();
      });
      req.end();
    });
  const worker = async (): Promise<void> => {
    while (next < count) {
      next += 1;
      await one();
    }
  };
  await Promise.all([worker(), worker(), worker(), worker()]);
  agent.destroy();
  return codes;
}

/** keygate_log_lines_dropped_total as /metrics serves it. */
async function droppedMetric(adminPort: number): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${adminPort}/metrics`, { headers: { authorization: `Bearer ${ADMIN_TOKEN}` } })).text();
  return Number(/^keygate_log_lines_dropped_total (\d+)$/m.exec(text)?.[1]);
}

const logLine = z.object({ level: z.number(), msg: z.string(), path: z.string().optional(), droppedLines: z.number().optional(), maxBytes: z.number().optional() });

/** The log lines of `stdout` (JSON only: the generated-token banner is not one). */
function logLines(stdout: string): z.infer<typeof logLine>[] {
  return stdout.split("\n").flatMap((line) => (line.startsWith("{") ? [logLine.parse(JSON.parse(line))] : []));
}

/** A keygate that writes an access line for every Check, and drains in 1 s. */
async function startWithAccessLog(): Promise<KeygateProcess> {
  const { dir, dataDir } = spawned.tempDataDir();
  const kg = await spawnKeygate({
    cwd: dir,
    env: embeddedEnv({ dataDir, adminToken: ADMIN_TOKEN, extra: { KEYGATE_ACCESS_LOG_SAMPLE: "1", KEYGATE_SHUTDOWN_GRACE_SECONDS: "1" } }),
  });
  spawned.running.push(kg);
  return kg;
}

describe("keygate serve with a stdout nobody reads", { timeout: 60_000 }, () => {
  it("error: holds at most STDOUT_LOG_MAX_BYTES of log, drops and counts the rest, and says so once stdout is read again", async () => {
    const kg = await startWithAccessLog();
    // The reader stops: once the parent's stream buffer and the socket's are full, keygate's writes get EAGAIN.
    kg.child.stdout?.pause();
    const before = kg.stdout().length;
    // About 7.8 MB of access lines; Checks keep being answered meanwhile.
    const checks = 6000;
    expect(await sendChecks(kg.ports.http, checks)).toEqual({ "401": checks });
    const droppedWhileBlocked = await droppedMetric(kg.ports.admin);
    expect(droppedWhileBlocked).toBeGreaterThan(0);

    // The reader comes back. The warning is logged once everything keygate held is written.
    kg.child.stdout?.resume();
    await until(() => kg.stdout().includes(DROPPED_MSG), 30_000, "the warning about dropped lines on stdout", { intervalMs: 50 });
    // What the socket's and the parent's stream buffers hold is well under 1 MiB; the rest was held by keygate.
    expect(kg.stdout().length - before).toBeLessThan(STDOUT_LOG_MAX_BYTES + 1024 * 1024);

    // Every access line either reached stdout or is counted as dropped, in the warning and the metric alike.
    const lines = logLines(kg.stdout());
    const written = lines.filter((line) => line.path?.startsWith(LONG_PATH_LOGGED) === true).length;
    const warnings = lines.filter((line) => line.msg === DROPPED_MSG);
    expect(warnings.map((line) => ({ level: line.level, maxBytes: line.maxBytes }))).toEqual([{ level: 40, maxBytes: STDOUT_LOG_MAX_BYTES }]);
    const dropped = warnings[0]?.droppedLines ?? 0;
    expect(written + dropped).toBe(checks);
    expect(dropped).toBeGreaterThanOrEqual(droppedWhileBlocked);
    expect(await droppedMetric(kg.ports.admin)).toBe(dropped);

    // Lines logged from then on are written again.
    expect(await sendChecks(kg.ports.http, 1, "/check/v1/blocked-stdout-marker")).toEqual({ "401": 1 });
    await until(() => kg.stdout().includes("blocked-stdout-marker"), 10_000, "the marker Check's access line on stdout", { intervalMs: 50 });
    expect(await kg.stop("SIGTERM")).toBe(0);
  });

  it("error: exits 0 after SIGTERM although stdout is still not read", async () => {
    const kg = await startWithAccessLog();
    kg.child.stdout?.pause();
    // About 2 MB of lines: more than the socket takes, so lines still wait for stdout at the exit.
    expect(await sendChecks(kg.ports.http, 1500)).toEqual({ "401": 1500 });
    kg.child.kill("SIGTERM");
    // The drain takes the 1 s grace, and the log then waits at most 2 s for stdout.
    await until(() => kg.child.exitCode !== null, 20_000, "keygate's exit with stdout still paused", { intervalMs: 50 });
    expect(kg.child.exitCode).toBe(0);
  });
});
