import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { builtCli, runBuiltCli } from "../harness/built-cli.js";
import type { CliResult } from "../harness/built-cli.js";
import { ADMIN_TOKEN, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { TcpRelay } from "../harness/tcp-relay.js";

// CreateKey has no idempotency key. When its answer is lost or late past the CLI's deadline, the
// key has been issued, yet `keygate keys create` said "…; keygate at … did not answer in time;
// retry". Doing as told issued a second key: two active keys take two slots under the plan's cap,
// and the first one's secret was never shown to anyone. Now a write a repeat would do twice says
// how to check whether keygate did it; reads, and writes a repeat leaves as they are, say "retry".

// Short, so the test waits 2 s instead of the default 30 s for each deadline.
const CALL_TIMEOUT = ["--call-timeout", "2"];
let kg: TestKeygate;
let slow: TcpRelay;

/** Runs `keygate <args>` against `url`. */
function cli(url: string, args: readonly string[]): Promise<CliResult> {
  return runBuiltCli(args, { url, adminToken: ADMIN_TOKEN, timeoutMs: 60_000 });
}

/** Runs the CLI through the relay that holds every answer past the deadline. */
function cliPastDeadline(args: readonly string[]): Promise<CliResult> {
  return cli(`http://127.0.0.1:${slow.port}`, [...CALL_TIMEOUT, ...args]);
}

beforeAll(async () => {
  // Fails by name when dist/ is missing or older than src/ (`npm run build` makes it).
  builtCli();
  kg = await startKeygate();
  for (const ownerId of ["cli-deadline", "cli-deadline-topup"]) await kg.admin.upsertAccount({ ownerId, plan: "business" });
  // Requests pass at once; every answer is held well past the CLI's call deadline.
  slow = new TcpRelay(kg.ports.admin, { answerDelayMs: () => 40_000 });
  await slow.listen();
});

afterAll(async () => {
  await slow.close();
  await kg.stop();
});

describe("keygate keys create whose answer comes after the deadline: error", { timeout: 120_000 }, () => {
  it("does not advise a blind retry of a create that keygate carried out, and names the check that finds the key", async () => {
    const first = await cliPastDeadline(["keys", "create", "--owner", "cli-deadline", "--name", "prod", "--quiet"]);
    expect(first.code).toBe(1);
    expect(first.stdout).toBe(""); // the secret reached nobody
    const afterFirst = (await kg.admin.listKeys({ ownerId: "cli-deadline" })).keys;
    expect(afterFirst.map((k) => k.state)).toEqual(["active"]); // ...but the key was issued

    // Before the fix: "keygate: deadline_exceeded: the operation timed out; keygate at http://… did not answer in time; retry".
    expect(first.stderr).not.toMatch(/did not answer in time; retry\n?$/);
    expect(first.stderr).toBe(
      `keygate: deadline_exceeded: the operation timed out; keygate at http://127.0.0.1:${slow.port} did not answer in time; ` +
        "keygate may have issued the key all the same: before retrying, look for it with keygate keys list --owner cli-deadline, " +
        "and revoke a key whose secret you did not get (keygate keys revoke <id>)\n",
    );

    // The check it names, keygate answering in time now, finds the key the lost answer issued.
    const check = await cli(`http://127.0.0.1:${kg.ports.admin}`, ["keys", "list", "--owner", "cli-deadline"]);
    expect(check.code).toBe(0);
    expect(check.stdout).toContain(afterFirst[0]?.id ?? "no key");
    expect((await kg.admin.listKeys({ ownerId: "cli-deadline" })).keys).toHaveLength(1);
  });

  it("accounts add-credits says to check before a retry without --idempotency-key, and retry with one", async () => {
    const [unkeyed, keyed] = await Promise.all([
      cliPastDeadline(["accounts", "add-credits", "cli-deadline-topup", "5"]),
      cliPastDeadline(["accounts", "add-credits", "cli-deadline-topup", "7", "--idempotency-key", "order-7"]),
    ]);
    expect([unkeyed.code, keyed.code]).toEqual([1, 1]);
    expect(unkeyed.stderr).toMatch(
      /did not answer in time; keygate may have added the credits all the same: before retrying, look for the top-up in keygate audit --owner cli-deadline-topup /,
    );
    // A repeat with the same idempotency key adds nothing if the first call did.
    expect(keyed.stderr).toMatch(/did not answer in time; retry\n$/);
  });
});

describe("keygate reads whose answer comes after the deadline: error", { timeout: 120_000 }, () => {
  it("keys list says retry: a repeat changes nothing", async () => {
    const result = await cliPastDeadline(["keys", "list", "--owner", "cli-deadline"]);
    expect(result.code).toBe(1);
    expect(result.stderr).toBe(`keygate: deadline_exceeded: the operation timed out; keygate at http://127.0.0.1:${slow.port} did not answer in time; retry\n`);
  });
});
