import { mkdtempSync, rmSync, utimesSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { stringify } from "yaml";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";
import { DEFAULT_POLICY_INPUT, loadPolicyFile } from "../../src/config.js";
import { ADMIN_TOKEN, postJson } from "../harness/keygate.js";
import { until } from "../harness/poll.js";
import { embeddedEnv, spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";

// A policy file read while it is being rewritten in place ends early. Since `routes` defaults to
// [], a prefix that ends before `routes:` is a valid policy with no scope requirement: applied,
// every route would be open to every key. A reload (SIGHUP or a file change) therefore waits until
// the files have not been written for 200 ms, checking their mtimes again while they keep changing,
// for at most 10 s, then reads them anyway and says so. (A writer paused longer than that is not
// told from a whole file by anyone: README asks for an atomic replace.) A file dated ahead of the
// clock stands for a writer still writing, for as long as the case needs, with no sleep.

const ADMIN_ROUTE = { method: "*", pathPrefix: "/v1/admin", requiredScopes: ["admin"] };
const BILLING_ROUTE = { method: "*", pathPrefix: "/v1/billing", requiredScopes: ["write"] };
const FIRST = stringify({ ...DEFAULT_POLICY_INPUT, routes: [ADMIN_ROUTE] });
const WHOLE = stringify({ ...DEFAULT_POLICY_INPUT, routes: [ADMIN_ROUTE, BILLING_ROUTE] });
/** WHOLE as a reader finds it while the writer is still at `routes:`. */
const CUT = WHOLE.slice(0, WHOLE.indexOf("\nroutes:") + 1);

const WAITS = "configuration reload waits until the files have not changed for 200 ms";
const READ_ANYWAY = "configuration files kept changing for 10 s; reading them anyway";
const WAIT_MS = 30_000;
const POLL = { intervalMs: 20 } as const;

const logLine = z.object({ msg: z.string(), policyFile: z.string().optional(), waitedMs: z.number().optional() });
type LogLine = z.infer<typeof logLine>;

describe("policy reload while the file is being written", { timeout: 90_000 }, () => {
  let dir: string;
  let policyFile: string;
  let kg: KeygateProcess;
  let secret = "";

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "keygate-reload-quiet-"));
    policyFile = join(dir, "policy.yaml");
    writeFileSync(policyFile, FIRST);
    kg = await spawnKeygate({ cwd: dir, env: embeddedEnv({ dataDir: join(dir, "data"), adminToken: ADMIN_TOKEN, policyFile }) });
    const created = await postJson(kg.ports.admin, "CreateKey", { ownerId: "quiet-owner", name: "k", scopes: ["read"] }, ADMIN_TOKEN);
    secret = String(created.json["secret"]);
  });
  afterAll(async () => {
    await kg?.stop("SIGTERM");
    rmSync(dir, { recursive: true, force: true });
  });

  const status = async (path: string): Promise<number> => (await fetch(`http://127.0.0.1:${kg.ports.http}/check${path}`, { headers: { "x-api-key": secret } })).status;
  const lines = (msg: string): LogLine[] =>
    kg
      .stdout()
      .split("\n")
      .filter((line) => line.startsWith("{"))
      .map((line) => logLine.parse(JSON.parse(line)))
      .filter((line) => line.msg === msg);
  /** The file, dated a minute ahead: to a reader, a writer still writing it. */
  const writeStillWriting = (text: string): void => {
    writeFileSync(policyFile, text);
    utimesSync(policyFile, new Date(), new Date(Date.now() + 60_000));
  };

  it("security: a SIGHUP during a rewrite waits for the file to be quiet; only the whole file is ever put in force", async () => {
    // What is at stake: the prefix alone loads, with no routes.
    const cutFile = join(dir, "cut.yaml");
    writeFileSync(cutFile, CUT);
    expect(loadPolicyFile(cutFile).routes).toEqual([]);
    expect(await status("/v1/admin/users")).toBe(403);

    writeStillWriting(CUT);
    kg.child.kill("SIGHUP");
    await until(() => lines(WAITS).length + lines("configuration reload").length > 0, WAIT_MS, "the reload to wait for the file, or to run", POLL);
    expect({ reloads: lines("configuration reload").map((line) => line.policyFile), adminRoute: await status("/v1/admin/users") }).toEqual({ reloads: [], adminRoute: 403 });

    writeFileSync(policyFile, WHOLE);
    await until(() => lines("configuration reload").length > 0, WAIT_MS, "the reload of the whole file", POLL);
    expect(lines("configuration reload").map((line) => line.policyFile)).toEqual(["applied"]);
    expect(lines("policy reloaded")).toHaveLength(1);
    expect([await status("/v1/admin/users"), await status("/v1/billing/invoices")]).toEqual([403, 403]);
    expect(lines(WAITS)).toHaveLength(1);
  });

  it("error: a file that never turns quiet is read after 10 s, with a warning", async () => {
    const reloadsBefore = lines("configuration reload").length;
    writeStillWriting(WHOLE);
    kg.child.kill("SIGHUP");
    await until(() => lines("configuration reload").length > reloadsBefore, WAIT_MS, "the reload after the longest wait", POLL);
    expect(lines("configuration reload").slice(reloadsBefore).map((line) => line.policyFile)).toEqual(["unchanged"]);
    const warned = lines(READ_ANYWAY);
    expect(warned).toHaveLength(1);
    expect(warned[0]?.waitedMs).toBeGreaterThanOrEqual(10_000);
    expect([await status("/v1/admin/users"), await status("/v1/billing/invoices")]).toEqual([403, 403]);
  });

  it("error: change events that keep coming less than 200 ms apart do not put the reload off past 10 s", async () => {
    const reloadsBefore = lines("configuration reload").length;
    const warnedBefore = lines(READ_ANYWAY).length;
    writeStillWriting(WHOLE);
    // Each touch is a change event to the watcher; each used to restart its 200 ms wait, so the
    // reload (and the 10 s bound, checked only when the wait ran out) never came.
    const touching = setInterval(() => utimesSync(policyFile, new Date(), new Date(Date.now() + 60_000)), 50);
    try {
      await until(() => lines("configuration reload").length > reloadsBefore, WAIT_MS, "the reload while the file keeps changing", POLL);
    } finally {
      clearInterval(touching);
    }
    expect(lines(READ_ANYWAY).length).toBe(warnedBefore + 1);
  });
});
