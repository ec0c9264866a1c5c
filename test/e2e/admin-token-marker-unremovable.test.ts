import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { until } from "../harness/poll.js";
import { spawnKeygate, spawnedKeygates } from "../harness/process.js";

// Until a start has printed the generated admin token, data/admin-token.unshown stays, and every
// start prints the token; the start that prints it removes the marker, once its listeners are up.
// A marker it cannot remove (a directory at that name, a read-only data directory) made serve()
// reject while keygate went on serving: "keygate: unexpected error" on stderr, exit code 1 set,
// and live reload (SIGHUP, file watch) never started. It is now a warning naming the file, and
// keygate carries on as any start does.

const LISTENERS = { KEYGATE_HOST: "127.0.0.1", KEYGATE_GRPC_PORT: "0", KEYGATE_HTTP_AUTHZ_PORT: "0", KEYGATE_ADMIN_PORT: "0", KEYGATE_LOG_LEVEL: "info" };
const TOKEN = "kgadm_marker-test-token-0123456789abcdef";
const WARNING = "the generated admin token could not be marked as shown: the next start prints it again";
const WAIT_MS = 15_000;
const POLL = { intervalMs: 50 } as const;

const { running, tempDataDir } = spawnedKeygates("keygate-unshown-marker-");

/** The JSON log lines with message `msg`. */
function lines(stdout: string, msg: string): Array<Record<string, unknown>> {
  return stdout
    .split("\n")
    .filter((line) => line.startsWith("{"))
    .map((line) => JSON.parse(line) as Record<string, unknown>)
    .filter((line) => line["msg"] === msg);
}

describe("embedded keygate: an admin-token.unshown marker that cannot be removed", { timeout: 60_000 }, () => {
  it("a directory at the marker's name: the token printed, one warning naming the file (not the token), and live reload works", async () => {
    const { dir, dataDir } = tempDataDir();
    writeFileSync(join(dataDir, "admin-token"), `${TOKEN}\n`, { mode: 0o600 });
    // rm of a directory fails whoever runs keygate, root included (EISDIR).
    const marker = join(dataDir, "admin-token.unshown");
    mkdirSync(marker);
    const kg = await spawnKeygate({ cwd: dir, env: { KEYGATE_DATA_DIR: dataDir, ...LISTENERS } });
    running.push(kg);
    await until(() => lines(kg.stdout(), WARNING).length > 0, WAIT_MS, "the warning about the marker", POLL);
    const [warning] = lines(kg.stdout(), WARNING);
    expect({
      level: warning?.["level"],
      file: warning?.["file"],
      cause: (warning?.["err"] as { code?: unknown } | undefined)?.code,
      printed: kg.stdout().split(TOKEN).length - 1,
    }).toEqual({ level: 40, file: marker, cause: "ERR_FS_EISDIR", printed: 1 });

    // serve() went on to start live reload: a SIGHUP reloads (it was held "until keygate has started", for ever).
    kg.child.kill("SIGHUP");
    await until(() => lines(kg.stdout(), "configuration reload").length > 0, WAIT_MS, "the SIGHUP's reload", POLL);
    expect(await kg.stop("SIGTERM")).toBe(0);
    expect({ stderr: kg.stderr(), tokenLogged: kg.stdout().split("\n").some((line) => line.startsWith("{") && line.includes(TOKEN)) }).toEqual({ stderr: "", tokenLogged: false });
  });
});
