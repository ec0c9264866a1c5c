import { createServer } from "node:http";
import type { Server } from "node:http";
import type { AddressInfo } from "node:net";
import { Writable } from "node:stream";
import { Code, ConnectError, createContextValues } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { echo } from "../../src/admin/vocabulary.js";
import { KeyAdmin } from "../../src/gen/keygate/v1/key_admin_pb.js";
import { scrubbedConnectHandler } from "../../src/server/connect-scrub.js";
import { createLogger } from "../../src/server/logger.js";
import { splitsSurrogatePair, withoutLoneSurrogates } from "../../src/surrogates.js";

// connect-es percent-encodes a gRPC or gRPC-Web error message with encodeURIComponent, which
// throws on a lone surrogate: the refusal became a bare HTTP 500. keygate's refusals quote the
// caller's input cut by length (echo()), and a cut inside a pair leaves half an emoji. echo() never
// cuts there, and scrubbedConnectHandler shows each lone surrogate a handler's error still holds as
// U+FFFD, so that a refusal stays what it is on every protocol.

const EMOJI = "😀";

describe("surrogates happy: pairs are found and kept", () => {
  it("splitsSurrogatePair is true only between the halves of a pair", () => {
    const text = `a${EMOJI}b`;
    expect([0, 1, 2, 3, 4].map((at) => splitsSurrogatePair(text, at))).toEqual([false, false, true, false, false]);
  });

  it("withoutLoneSurrogates shows each lone half as U+FFFD and leaves pairs whole", () => {
    expect(withoutLoneSurrogates(`\ud83d|\ude00|${EMOJI}|\ude00\ud83d`)).toBe(`\uFFFD|\uFFFD|${EMOJI}|\uFFFD\uFFFD`);
  });
});

describe("echo() security: a quoted value never ends in half an emoji", () => {
  // "a." repeated: no run of 32 letters, which echo() would redact as looking like a secret.
  const head63 = `${"a.".repeat(31)}a`;

  it("an emoji across the 64-unit cut is left out whole", () => {
    expect(echo(`${head63}${EMOJI}b`)).toBe(head63);
  });

  it("happy: an emoji that ends at the cut is kept, and the cut is 64 units otherwise", () => {
    expect(echo(`${"a.".repeat(31)}${EMOJI}b`)).toBe(`${"a.".repeat(31)}${EMOJI}`);
    expect(echo("a.".repeat(50))).toBe("a.".repeat(32));
  });
});

/** A KeyAdmin whose CreateKey refuses with `message` and `code`, served by scrubbedConnectHandler on HTTP/1.1. */
function refusingServer(message: string, code: Code): Server {
  const logger = createLogger("silent", new Writable({ write: (_chunk, _encoding, callback) => callback() }));
  const handler = scrubbedConnectHandler({
    routes: (router) =>
      router.service(KeyAdmin, {
        createKey() {
          throw new ConnectError(message, code, { "x-refusal": "kept" });
        },
      }),
    logger,
    contextValues: () => createContextValues(),
  });
  return createServer(handler);
}

describe("scrubbedConnectHandler security: a handler's error with a lone surrogate is answered, not a bare 500", () => {
  let server: Server;
  let url = "";
  beforeAll(async () => {
    server = refusingServer(`unknown scope "a\ud83d"`, Code.NotFound);
    await new Promise<void>((listening) => server.listen(0, "127.0.0.1", listening));
    url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/keygate.v1.KeyAdmin/CreateKey`;
  });
  afterAll(async () => {
    server.closeAllConnections();
    await new Promise<void>((closed) => server.close(() => closed()));
  });

  it("gRPC-Web: 200 with a trailer frame holding its code, the half emoji as U+FFFD, and its metadata", async () => {
    const res = await fetch(url, { method: "POST", headers: { "content-type": "application/grpc-web+json" }, body: Buffer.from([0, 0, 0, 0, 2, 0x7b, 0x7d]) });
    const bytes = Buffer.from(await res.arrayBuffer());
    expect({ status: res.status, flags: bytes[0], length: bytes.readUInt32BE(1) }).toEqual({ status: 200, flags: 0x80, length: bytes.length - 5 });
    const lines = bytes.subarray(5).toString("utf8").trim().split("\r\n").sort();
    expect(lines).toEqual(["grpc-message: unknown%20scope%20%22a%EF%BF%BD%22", "grpc-status: 5", "x-refusal: kept"]);
  });

  it("Connect: 404 not_found, the half emoji as U+FFFD", async () => {
    const res = await fetch(url, { method: "POST", headers: { "content-type": "application/json" }, body: "{}" });
    expect({ status: res.status, json: await res.json(), refusal: res.headers.get("x-refusal") }).toEqual({
      status: 404,
      json: { code: "not_found", message: 'unknown scope "a\uFFFD"' },
      refusal: "kept",
    });
  });
});
