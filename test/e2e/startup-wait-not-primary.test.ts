import type { ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import type { Server, Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { BSON } from "bson";
import { afterAll, describe, expect, it } from "vitest";
import { serveUntilExit } from "../harness/process.js";

// A single-node replica set that restarts comes back as SECONDARY for a few seconds before it
// elects itself; with `directConnection=true` (the usual URI for one in Docker) the driver talks
// to it at once: reads answer, writes and createIndexes answer NotWritablePrimary (10107). That is
// a MongoDB not ready yet, which a start tries again for KEYGATE_STARTUP_WAIT_SECONDS as it does
// one that does not answer; it exited 2 at the first try ("MongoDB could not be opened").

const PEPPER = "p".repeat(40);
const ADMIN = `kgadm_${"t".repeat(30)}`;
const RETRY_LINE = "trying again (the start waits KEYGATE_STARTUP_WAIT_SECONDS)";

const children = new Set<ChildProcess>();
const dirs: string[] = [];
const servers: Server[] = [];
afterAll(() => {
  for (const child of children) child.kill("SIGKILL");
  for (const server of servers) server.close();
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), "keygate-startup-wait-primary-"));
  dirs.push(dir);
  return dir;
}

const OP_REPLY = 1;
const OP_QUERY = 2004;
const OP_MSG = 2013;
const WRITES = new Set(["insert", "update", "delete", "findAndModify", "findandmodify", "createIndexes", "create"]);

/** A MongoDB wire server that answers as a replica set member still SECONDARY. */
async function secondaryMember(): Promise<number> {
  let port = 0;
  const reply = (command: Record<string, unknown>): Record<string, unknown> => {
    const name = Object.keys(command)[0] ?? "";
    if (/^(hello|ismaster|isMaster)$/.test(name)) {
      return {
        ismaster: false,
        isWritablePrimary: false,
        secondary: true,
        setName: "rs0",
        setVersion: 1,
        hosts: [`127.0.0.1:${port}`],
        me: `127.0.0.1:${port}`,
        helloOk: true,
        maxBsonObjectSize: 16 * 1024 * 1024,
        maxMessageSizeBytes: 48_000_000,
        maxWriteBatchSize: 100_000,
        localTime: new Date(),
        logicalSessionTimeoutMinutes: 30,
        connectionId: 1,
        minWireVersion: 0,
        maxWireVersion: 21,
        ok: 1,
      };
    }
    if (WRITES.has(name)) return { ok: 0, code: 10107, codeName: "NotWritablePrimary", errmsg: "not primary" };
    if (name === "find" || name === "aggregate" || name === "listIndexes") {
      return { cursor: { id: BSON.Long.fromNumber(0), ns: `keygate.${String(command[name])}`, firstBatch: [] }, ok: 1 };
    }
    return { ok: 1 };
  };
  const handle = (socket: Socket): void => {
    let buffered = Buffer.alloc(0);
    socket.on("error", () => undefined);
    socket.on("data", (chunk: Buffer) => {
      buffered = Buffer.concat([buffered, chunk]);
      while (buffered.length >= 16 && buffered.length >= buffered.readInt32LE(0)) {
        const length = buffered.readInt32LE(0);
        const message = buffered.subarray(0, length);
        buffered = buffered.subarray(length);
        const requestId = message.readInt32LE(4);
        const opCode = message.readInt32LE(12);
        if (opCode === OP_QUERY) {
          let at = 20;
          while (message[at] !== 0) at++;
          at += 1 + 8;
          const query = BSON.deserialize(message.subarray(at, at + message.readInt32LE(at)));
          const body = BSON.serialize(reply(query));
          const header = Buffer.alloc(36);
          header.writeInt32LE(36 + body.length, 0);
          header.writeInt32LE(1, 4);
          header.writeInt32LE(requestId, 8);
          header.writeInt32LE(OP_REPLY, 12);
          header.writeInt32LE(0, 16);
          header.writeBigInt64LE(0n, 20);
          header.writeInt32LE(0, 28);
          header.writeInt32LE(1, 32);
          socket.write(Buffer.concat([header, body]));
        } else if (opCode === OP_MSG) {
          // flagBits, then section kind 0 (the command); document sequences (kind 1) are ignored.
          const at = 21;
          const command = BSON.deserialize(message.subarray(at, at + message.readInt32LE(at)));
          const body = BSON.serialize(reply(command));
          const header = Buffer.alloc(21);
          header.writeInt32LE(21 + body.length, 0);
          header.writeInt32LE(1, 4);
          header.writeInt32LE(requestId, 8);
          header.writeInt32LE(OP_MSG, 12);
          header.writeUInt32LE(0, 16);
          header.writeUInt8(0, 20);
          socket.write(Buffer.concat([header, body]));
        } else {
          socket.destroy();
        }
      }
    });
  };
  const server = createServer(handle);
  servers.push(server);
  await new Promise<void>((done) => server.listen(0, "127.0.0.1", done));
  const address = server.address();
  if (typeof address !== "object" || address === null) throw new Error("no port");
  port = address.port;
  return port;
}

describe("a MongoDB not yet primary at start.error", () => {
  it("is tried again for KEYGATE_STARTUP_WAIT_SECONDS, as a MongoDB that does not answer yet", async () => {
    const port = await secondaryMember();
    const env = {
      KEYGATE_DATA_DIR: join(tempDir(), "data"),
      KEYGATE_MONGODB_URI: `mongodb://127.0.0.1:${port}/keygate?directConnection=true`,
      KEYGATE_PEPPER: PEPPER,
      KEYGATE_ADMIN_TOKENS: ADMIN,
      KEYGATE_HOST: "127.0.0.1",
      KEYGATE_GRPC_PORT: "0",
      KEYGATE_HTTP_AUTHZ_PORT: "0",
      KEYGATE_ADMIN_PORT: "0",
      KEYGATE_STARTUP_WAIT_SECONDS: "4",
    };
    const result = await serveUntilExit(tempDir(), env, children);
    expect(result.code).toBe(2);
    const retries = result.stdout.split("\n").filter((line) => line.includes(RETRY_LINE));
    expect(retries.length, result.stderr).toBeGreaterThan(0);
    expect(retries[0]).toContain("KEYGATE_MONGODB_URI: MongoDB is not primary yet (not primary)");
    expect(result.stderr).toBe("keygate: KEYGATE_MONGODB_URI: MongoDB is not primary yet (not primary)\n");
  }, 60_000);
});
