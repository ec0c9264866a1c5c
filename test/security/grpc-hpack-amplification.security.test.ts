import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Socket } from "node:net";
import { create, toBinary } from "@bufbuild/protobuf";
import { Client as GrpcClient, credentials, Metadata } from "@grpc/grpc-js";
import type { ServiceError } from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { GrpcEngine } from "../../src/config.js";
import { CheckRequestSchema } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import type { CheckResponse } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { HealthCheckRequestSchema } from "../../src/gen/grpc/health/v1/health_pb.js";
import { authorizationDefinition } from "../../src/server/grpc-authz.js";
import { spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";
import { H2_PREFACE, H2_SETTINGS, h2Frame, hpackLiterals, openSocket, processMemory } from "../harness/sockets.js";

// An attacker that reaches the gRPC port, with no key, sends HEADERS that cost ~120 bytes each on the wire but
// reference one 4,000-byte HPACK dynamic-table entry 120 times (RFC 7541 indexed fields): each
// stream's header list is ~480 KB once decoded. The streams never send END_STREAM. The h2 engine
// runs node:http2 with its default maxSessionMemory (10 MB), so the session is refused
// (ENHANCE_YOUR_CALM, GOAWAY) and keygate holds nothing. The grpc-js engine runs grpc-js, which
// sets maxSessionMemory to Number.MAX_SAFE_INTEGER and has no arrival timeout: every stream's
// decoded metadata is kept for as long as the client keeps the stream open.

const MiB = 1024 * 1024;
const STREAMS = 250;
const CONNECTIONS = 2;

const REQUEST: Array<[string, string]> = [
  [":method", "POST"],
  [":scheme", "http"],
  [":path", authorizationDefinition.Check.path],
  [":authority", "keygate"],
  ["content-type", "application/grpc"],
  ["te", "trailers"],
];

/** A literal header field with incremental indexing (RFC 7541 §6.2.1), new name, no Huffman: it becomes dynamic-table entry 62. */
function indexedLiteral(name: string, value: string): Buffer {
  const length = (n: number): Buffer => {
    if (n < 127) return Buffer.from([n]);
    const out = [0x7f];
    let rest = n - 127;
    while (rest >= 128) {
      out.push((rest & 0x7f) | 0x80);
      rest >>= 7;
    }
    out.push(rest);
    return Buffer.from(out);
  };
  return Buffer.concat([Buffer.from([0x40]), length(name.length), Buffer.from(name, "latin1"), length(value.length), Buffer.from(value, "latin1")]);
}

/** A raw HTTP/2 connection that answers the server's PINGs and resolves `acked(payload)` on our PING's ACK or the connection's close. */
async function rawConnection(port: number): Promise<{ socket: Socket; write(bytes: Buffer): void; pingAcked(payload: Buffer): Promise<"acked" | "closed"> }> {
  const socket = await openSocket(port);
  let pending = Buffer.alloc(0);
  let closed = false;
  const waiters: Array<{ payload: Buffer; resolve: (r: "acked" | "closed") => void }> = [];
  socket.on("error", () => undefined);
  socket.on("close", () => {
    closed = true;
    for (const w of waiters.splice(0)) w.resolve("closed");
  });
  socket.on("data", (chunk: Buffer) => {
    pending = Buffer.concat([pending, chunk]);
    while (pending.length >= 9) {
      const length = pending.readUIntBE(0, 3);
      if (pending.length < 9 + length) break;
      const type = pending[3];
      const flags = pending[4] ?? 0;
      const payload = pending.subarray(9, 9 + length);
      pending = pending.subarray(9 + length);
      if (type === 0x6 && (flags & 0x1) === 0) socket.write(h2Frame(0x6, 0x1, 0, Buffer.from(payload)));
      if (type === 0x6 && (flags & 0x1) === 1) {
        for (const w of waiters.splice(0)) if (w.payload.equals(payload)) w.resolve("acked");
      }
    }
  });
  socket.write(Buffer.concat([H2_PREFACE, H2_SETTINGS]));
  return {
    socket,
    write: (bytes) => socket.write(bytes),
    pingAcked: (payload) =>
      new Promise((resolve) => {
        if (closed) return resolve("closed");
        waiters.push({ payload, resolve });
        socket.write(h2Frame(0x6, 0, 0, payload));
      }),
  };
}

describe.each<GrpcEngine>(["h2", "grpc-js"])("gRPC port (%s engine): HPACK-amplified header lists on streams that never end", (engine) => {
  let kp: KeygateProcess;
  let dataDir: string;
  let victim: GrpcClient;
  const sockets: Socket[] = [];

  beforeAll(async () => {
    dataDir = mkdtempSync(join(tmpdir(), "keygate-hpack-"));
    kp = await spawnKeygate({
      cwd: dataDir,
      env: {
        KEYGATE_DATA_DIR: dataDir,
        KEYGATE_ADMIN_TOKENS: "kgadm_test_token_0123456789abcdefghij",
        KEYGATE_HOST: "127.0.0.1",
        KEYGATE_GRPC_PORT: "0",
        KEYGATE_HTTP_AUTHZ_PORT: "0",
        KEYGATE_ADMIN_PORT: "0",
        KEYGATE_GRPC_ENGINE: engine,
      },
    });
    victim = new GrpcClient(`127.0.0.1:${kp.ports.grpc}`, credentials.createInsecure());
  }, 60_000);

  afterAll(async () => {
    for (const socket of sockets) socket.destroy();
    victim.close();
    await kp.stop();
    rmSync(dataDir, { recursive: true, force: true });
  });

  function victimCheck(): Promise<CheckResponse | ServiceError> {
    const def = authorizationDefinition.Check;
    const request = create(CheckRequestSchema, { attributes: { request: { http: { id: "victim", method: "GET", path: "/v1/decks", headers: {} } } } });
    return new Promise((resolve) => {
      victim.makeUnaryRequest(def.path, def.requestSerialize, def.responseDeserialize, request, new Metadata(), (error, response) => resolve(error ?? (response as CheckResponse)));
    });
  }

  it("a health Check for a 30,000-character service name is NOT_FOUND quoting 200 characters of it (not a reset stream)", async () => {
    const service = "s".repeat(30_000);
    const error = await new Promise<ServiceError | null>((resolve) => {
      victim.makeUnaryRequest(
        "/grpc.health.v1.Health/Check",
        (message: Uint8Array) => Buffer.from(message),
        (bytes: Buffer) => bytes,
        toBinary(HealthCheckRequestSchema, create(HealthCheckRequestSchema, { service })),
        new Metadata(),
        (failure) => resolve(failure),
      );
    });
    expect({ code: error?.code, details: error?.details }).toEqual({ code: 5, details: `unknown service "${"s".repeat(200)}… (30000 characters)"` });
  });

  it("a few KB sent cost keygate a bounded amount of memory, and a legitimate Check is still answered", async () => {
    const pid = kp.child.pid as number;
    // Warm the victim's channel first, so its own connection is not counted in the growth.
    const warm = await victimCheck();
    expect(warm instanceof Error).toBe(false);

    const before = processMemory(pid).rssBytes;
    let sentBytes = 0;
    const outcomes: string[] = [];
    for (let c = 0; c < CONNECTIONS; c++) {
      const conn = await rawConnection(kp.ports.grpc);
      sockets.push(conn.socket);
      const base = hpackLiterals(REQUEST);
      // "v," makes grpc-js split the value into 2,000 parts, as it does any comma-separated value.
      const entry = indexedLiteral("x-amplified", "v,".repeat(2000));
      const references = Buffer.alloc(120, 0x80 | 62);
      for (let i = 0; i < STREAMS; i++) {
        const block = Buffer.concat([base, i === 0 ? entry : Buffer.alloc(0), references]);
        const frame = h2Frame(0x1, 0x4, 1 + 2 * i, block); // END_HEADERS, no END_STREAM
        sentBytes += frame.length;
        conn.write(frame);
      }
      // The server handles frames in order: our PING's ACK means every HEADERS before it was read.
      outcomes.push(await conn.pingAcked(Buffer.from(`probe00${c}`)));
    }
    const growth = processMemory(pid).rssBytes - before;

    const answer = await victimCheck();
    expect(answer instanceof Error ? `error ${answer.code}` : answer.httpResponse.case).toBe("deniedResponse");
    expect(kp.child.exitCode).toBeNull();
    // About 140 KB sent over two connections. Bound: 64 MiB of resident memory.
    expect(sentBytes).toBeLessThan(256 * 1024);
    expect(growth, `RSS grew ${Math.round(growth / MiB)} MiB for ${sentBytes} bytes sent (connections: ${outcomes.join(", ")})`).toBeLessThan(64 * MiB);
  });
});
