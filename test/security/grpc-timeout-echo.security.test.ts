import type { Socket } from "node:net";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { authorizationDefinition } from "../../src/server/grpc-authz.js";
import { startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { until } from "../harness/poll.js";
import { H2_PREFACE, H2_SETTINGS, h2Frame, hpackLiterals, openSocket } from "../harness/sockets.js";

// An invalid grpc-timeout is quoted in the answer's grpc-message cut to 200 characters, as a path
// and a health service name are (echoedName), so an answer always fits a client's header limit and
// one byte a stream cannot buy kilobytes of answer: a value of 4,000 bytes of 0xE9 put once in the
// HPACK dynamic table and then referenced with one byte per stream made every stream's answer an
// 18 KB header block.

const STREAMS = 50;
const REQUEST: Array<[string, string]> = [
  [":method", "POST"],
  [":scheme", "http"],
  [":path", authorizationDefinition.Check.path],
  [":authority", "keygate"],
  ["content-type", "application/grpc"],
  ["te", "trailers"],
];

/** Literal with incremental indexing, new name, no Huffman (RFC 7541 §6.2.1): dynamic entry 62. */
function indexedLiteral(name: string, value: Buffer): Buffer {
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
  return Buffer.concat([Buffer.from([0x40]), length(name.length), Buffer.from(name, "latin1"), length(value.length), value]);
}

let kg: TestKeygate;
let socket: Socket | undefined;

describe("gRPC port (h2): an invalid grpc-timeout echoed in grpc-message", () => {
  beforeAll(async () => {
    kg = await startKeygate();
  });
  afterAll(async () => {
    socket?.destroy();
    await kg?.stop();
  });

  it("is quoted to at most 200 characters, so ~50 bytes sent per stream do not get a 24 KB answer each", async () => {
    socket = await openSocket(kg.ports.grpc);
    socket.on("error", () => undefined);
    let received = 0;
    let pending = Buffer.alloc(0);
    let answers = 0;
    const headerBlockBytes: number[] = [];
    let current = 0;
    socket.on("data", (chunk: Buffer) => {
      received += chunk.length;
      pending = Buffer.concat([pending, chunk]);
      while (pending.length >= 9) {
        const length = pending.readUIntBE(0, 3);
        if (pending.length < 9 + length) break;
        const type = pending[3];
        const flags = pending[4] ?? 0;
        pending = pending.subarray(9 + length);
        if (type === 0x1 || type === 0x9) {
          current += length;
          if ((flags & 0x4) !== 0) {
            headerBlockBytes.push(current);
            current = 0;
            if ((flags & 0x1) !== 0 || type === 0x9) answers += 1;
          }
        }
      }
    });
    const base = hpackLiterals(REQUEST);
    const timeoutEntry = indexedLiteral("grpc-timeout", Buffer.alloc(4000, 0xe9));
    let sent = H2_PREFACE.length + H2_SETTINGS.length;
    socket.write(Buffer.concat([H2_PREFACE, H2_SETTINGS]));
    for (let i = 0; i < STREAMS; i++) {
      // END_HEADERS | END_STREAM; the first stream adds the value to the table, the rest name it with one byte.
      const block = Buffer.concat([base, i === 0 ? timeoutEntry : Buffer.from([0x80 | 62])]);
      const frame = h2Frame(0x1, 0x5, 1 + 2 * i, block);
      sent += frame.length;
      socket.write(frame);
    }
    await until(() => headerBlockBytes.length >= STREAMS, 10_000, "every stream answered");
    const largest = Math.max(...headerBlockBytes);
    // Expected once cut as a path or service name is: 200 characters, each up to 6 bytes
    // percent-encoded, plus the fixed text, never all 4,000 of them.
    expect({ largestAnswerHeaderBlock: largest < 2048, receivedUnder20xSent: received < 20 * sent }, `received ${received} bytes for ${sent} sent; largest answer header block ${largest} bytes; answers ${answers}`).toEqual({
      largestAnswerHeaderBlock: true,
      receivedUnder20xSent: true,
    });
  });
});
