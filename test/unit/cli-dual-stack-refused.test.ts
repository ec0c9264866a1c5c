import { connect, createServer } from "node:net";
import { Code, ConnectError } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { serverFailure } from "../../src/cli/errors.js";

// `localhost` resolves to ::1 and 127.0.0.1 on most hosts (/etc/hosts: "::1 localhost"). With
// keygate not running, Node (autoSelectFamily, the default since Node 20) tries both and fails
// with an AggregateError whose own `code` is ECONNREFUSED but which has no `syscall` (each inner
// error has syscall "connect"). connect-node makes that Code.Unavailable with the AggregateError
// as cause. No request was ever sent: the CLI should say "is keygate running at …?" with no
// "may have issued the key" check, as for a plain refused connection.

const URL = "http://localhost:8080";
const CREATE_CHECK = "keygate may have issued the key all the same: before retrying, look for it with keygate keys list --owner u1";

async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((ready) => server.listen(0, "127.0.0.1", ready));
  const address = server.address();
  if (address === null || typeof address === "string") throw new Error("no port");
  await new Promise<void>((closed) => server.close(() => closed()));
  return address.port;
}

/** The error Node gives for a host with an IPv6 and an IPv4 address, both refusing. */
async function dualStackRefusal(): Promise<Error> {
  const port = await closedPort();
  return new Promise((done) => {
    const socket = connect({
      host: "localhost",
      port,
      autoSelectFamily: true,
      lookup: (_host, _options, callback) =>
        callback(null, [
          { address: "::1", family: 6 },
          { address: "127.0.0.1", family: 4 },
        ]),
    });
    socket.on("error", (error) => done(error));
  });
}

describe("serverFailure() when every address of the host refused the connection", () => {
  it("says keygate is not running there, and gives no check-before-retry for a write never sent", async () => {
    const cause = await dualStackRefusal();
    expect({ name: cause.name, code: (cause as { code?: unknown }).code }).toEqual({ name: "AggregateError", code: "ECONNREFUSED" });
    // As connect-node's connectErrorFromNodeReason makes it (ECONNREFUSED in the chain: Unavailable, the error as cause).
    const error = new ConnectError(cause.message, Code.Unavailable, undefined, undefined, cause);
    const line = serverFailure(error, URL, CREATE_CHECK).message;
    expect(line).toContain(`is keygate running at ${URL}? (set --url or KEYGATE_URL)`);
    expect(line).not.toContain("may have issued");
  });
});
