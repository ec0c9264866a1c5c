import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { builtCli, runBuiltCli } from "../harness/built-cli.js";
import type { CliResult } from "../harness/built-cli.js";
import { ADMIN_TOKEN, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// `--url` at keygate's gRPC Check port (HTTP/2 only) instead of its admin port: the HTTP/1.1 call
// breaks on the client's side (EPIPE, ECONNRESET). The CLI said "internal: write EPIPE; see
// keygate's log", blaming a server that logged nothing, or "aborted: read ECONNRESET" with no
// advice. A connection that breaks is the client's failure: the hint says so and names the port.

let kg: TestKeygate;

/** Runs `keygate <args>` against `url`. */
function cli(url: string, args: readonly string[]): Promise<CliResult> {
  return runBuiltCli(args, { url, adminToken: ADMIN_TOKEN, timeoutMs: 20_000 });
}

beforeAll(async () => {
  // Fails by name when dist/ is missing or older than src/ (`npm run build` makes it).
  builtCli();
  kg = await startKeygate();
});

afterAll(async () => {
  await kg.stop();
});

describe("keygate CLI pointed at the gRPC Check port: error", { timeout: 60_000 }, () => {
  it("a read and a write: exit 1, one line saying the connection failed and asking for the admin port, not keygate's log", async () => {
    const url = `http://127.0.0.1:${kg.ports.grpc}`;
    const [read, write] = await Promise.all([
      cli(url, ["keys", "list", "--owner", "cli-wrong-port"]),
      cli(url, ["keys", "create", "--owner", "cli-wrong-port", "--name", "k", "--scope", "x".repeat(64 * 1024)]),
    ]);
    for (const result of [read, write]) {
      expect(result.code).toBe(1);
      expect(result.stdout).toBe("");
      expect(result.stderr.split("\n")).toHaveLength(2); // one line, then the end
      expect(result.stderr).toMatch(new RegExp(`^keygate: [a-z_]+: .*; the connection to http://127\\.0\\.0\\.1:${kg.ports.grpc} failed: is it keygate's admin port\\? \\(set --url or KEYGATE_URL\\)`));
      expect(result.stderr).not.toContain("see keygate's log");
    }
    // A write may have reached something: it says how to check before a retry.
    expect(write.stderr).toContain("keygate may have issued the key all the same: before retrying, look for it with keygate keys list --owner cli-wrong-port");
    expect((await kg.admin.listKeys({ ownerId: "cli-wrong-port" })).keys).toEqual([]);
  });
});
