import { Writable } from "node:stream";
import { gzipSync } from "node:zlib";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { withoutSecrets } from "../../src/server/connect-scrub.js";
import { createLogger } from "../../src/server/logger.js";
import { ADMIN_TOKEN, grpcFrame, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// An error keygate writes is compressed (gRPC-Web trailer frame, Connect error body) once it
// reaches 1 KiB and the caller accepts gzip; keygate inflates it to scrub it, within a bound. That
// bound was 1 MiB, but the JSON decoder quotes the caller's unknown key whole before keygate cuts
// it, and with KEYGATE_ADMIN_MAX_BODY_BYTES raised (up to 16 MiB) a key may be far longer: a
// caller's own mistake was INVALID_ARGUMENT uncompressed, but with gzip accepted INTERNAL (gRPC-Web,
// an error line logged) or a bare HTTP 500 (Connect, "KeyAdmin handler failed"). The bound now
// follows the configured limit (three bytes a byte, as a grpc-message percent-encodes), and a body
// that still cannot be inflated is a well-formed INTERNAL error, never a bare 500.

const MAX_BODY_BYTES = 4 * 1024 * 1024;
const FAILURES = ["KeyAdmin handler failed", "KeyAdmin error trailer unreadable", "KeyAdmin error body unreadable"];

let kg: TestKeygate;
beforeAll(async () => {
  kg = await startKeygate({ env: { KEYGATE_ADMIN_MAX_BODY_BYTES: String(MAX_BODY_BYTES) } });
});
afterAll(async () => {
  await kg?.stop();
});

/** The decoder's message once keygate has cut it: the first 64 characters after "from JSON: ", "…", the last 16. */
function boundedUnknownKey(key: string): string {
  const detail = `key "${key}" is unknown`;
  return `cannot decode message keygate.v1.GetKeyRequest from JSON: ${detail.slice(0, 64)}…${detail.slice(-16)}`;
}

/** A gRPC-Web trailer frame's grpc-status and decoded grpc-message. */
function trailer(bytes: Buffer): { status: string | undefined; message: string | undefined } {
  for (let at = 0; at + 5 <= bytes.length; at += 5 + bytes.readUInt32BE(at + 1)) {
    if (((bytes[at] ?? 0) & 0x80) === 0) continue;
    const fields = new Map<string, string>();
    for (const line of bytes.subarray(at + 5, at + 5 + bytes.readUInt32BE(at + 1)).toString("utf8").split("\r\n")) {
      const colon = line.indexOf(":");
      if (colon > 0) fields.set(line.slice(0, colon), line.slice(colon + 1).trim());
    }
    const message = fields.get("grpc-message");
    return { status: fields.get("grpc-status"), message: message === undefined ? undefined : decodeURIComponent(message) };
  }
  return { status: undefined, message: undefined };
}

async function grpcWebGetKey(key: string, accept: string | null): Promise<{ status: string | undefined; message: string | undefined }> {
  const headers: Record<string, string> = { "content-type": "application/grpc-web+json", authorization: `Bearer ${ADMIN_TOKEN}` };
  if (accept !== null) headers["grpc-accept-encoding"] = accept;
  const res = await fetch(`http://127.0.0.1:${kg.ports.admin}/keygate.v1.KeyAdmin/GetKey`, { method: "POST", headers, body: grpcFrame(JSON.stringify({ [key]: 1 })) });
  return trailer(Buffer.from(await res.arrayBuffer()));
}

async function connectGetKey(key: string, accept: string): Promise<{ status: number; body: unknown }> {
  const res = await fetch(`http://127.0.0.1:${kg.ports.admin}/keygate.v1.KeyAdmin/GetKey`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${ADMIN_TOKEN}`, "accept-encoding": accept },
    body: JSON.stringify({ [key]: 1 }),
  });
  return { status: res.status, body: (await res.json()) as unknown };
}

function failuresLogged(): string[] {
  return kg.logLines.filter((line) => FAILURES.some((failure) => line.includes(failure)));
}

describe("admin large decoder error security: a caller's unknown JSON key far over 1 MiB (admin body limit 4 MiB)", () => {
  const ascii = "a".repeat(1_500_000);
  // As long as the limit allows (the frame's 5-byte head, '{"' and '":1}' around it): each "é" is
  // two bytes, and six percent-encoded ("%C3%A9"), so the trailer is three times the body, 12 MB.
  const accented = "é".repeat(Math.floor((MAX_BODY_BYTES - 5 - 6) / 2));

  it.each([
    ["1.5 MB of ASCII", ascii],
    ["4 MiB of two-byte characters, the most a grpc-message grows", accented],
  ])("gRPC-Web, %s: INVALID_ARGUMENT with the message bounded, whether or not the caller accepts gzip; nothing logged as a failure", async (_case, key) => {
    const expected = { status: "3", message: boundedUnknownKey(key) };
    expect({ identity: await grpcWebGetKey(key, null), gzip: await grpcWebGetKey(key, "gzip"), failures: failuresLogged() }).toEqual({
      identity: expected,
      gzip: expected,
      failures: [],
    });
  }, 60_000);

  it("Connect JSON, 1.5 MB of ASCII: 400 invalid_argument with the message bounded, whether or not the caller accepts gzip; nothing logged as a failure", async () => {
    const expected = { status: 400, body: { code: "invalid_argument", message: boundedUnknownKey(ascii) } };
    expect({ identity: await connectGetKey(ascii, "identity"), gzip: await connectGetKey(ascii, "gzip"), failures: failuresLogged() }).toEqual({
      identity: expected,
      gzip: expected,
      failures: [],
    });
  }, 60_000);
});

describe("admin large decoder error security: a compressed Connect error body that cannot be inflated", () => {
  const once = async function* (bytes: Uint8Array): AsyncIterable<Uint8Array> {
    yield bytes;
  };
  const LIMIT = 64 * 1024;

  it.each([
    ["more than the bound inflated", gzipSync(Buffer.from(JSON.stringify({ code: "invalid_argument", message: "x".repeat(LIMIT + 1) })))],
    ["gzip cut short", gzipSync(Buffer.from(JSON.stringify({ code: "invalid_argument", message: "kg_live_0123456789abcdef" }))).subarray(0, 20)],
  ])("%s: a well-formed 500 internal error, uncompressed, the cause logged", async (_case, body) => {
    const lines: string[] = [];
    const sink = new Writable({
      write(chunk: Buffer, _encoding, callback) {
        lines.push(chunk.toString("utf8"));
        callback();
      },
    });
    const header = new Headers({ "content-type": "application/json", "content-encoding": "gzip" });
    const answer = await withoutSecrets({ status: 400, header, body: once(body) }, false, createLogger("info", sink), LIMIT);
    let text = "";
    for await (const chunk of answer.body ?? []) text += new TextDecoder().decode(chunk);
    expect({
      status: answer.status,
      encoding: header.get("content-encoding"),
      length: header.get("content-length"),
      body: JSON.parse(text) as unknown,
      logged: lines.map((line) => String((JSON.parse(line) as { msg?: unknown }).msg)),
    }).toEqual({
      status: 500,
      encoding: null,
      length: String(Buffer.byteLength(text)),
      body: { code: "internal", message: "internal error" },
      logged: ["KeyAdmin error body unreadable"],
    });
  });
});
