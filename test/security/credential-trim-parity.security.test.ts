import { request } from "node:http";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// The same X-API-Key value judged through gRPC Check and through the HTTP mode gets the same
// answer. A gRPC Check's header values are read as UTF-8 and the HTTP mode's as Latin-1
// (node:http), so a trim of Unicode white space (U+00A0, U+FEFF, U+2028, U+3000) made the same
// client bytes the key on one and a malformed credential on the other: "<key>\xC2\xA0" (UTF-8
// no-break space) passed gRPC, "<key>\xA0" (one byte) passed HTTP. Only spaces and tabs around
// the value are trimmed; anything else is not the key's shape: 401 everywhere.

let kg: TestKeygate;
let key: string;

/** GET /check/v1/things with one x-api-key line whose value is these exact bytes (as latin1). */
function httpWithRawKey(port: number, valueBytes: Buffer): Promise<{ status: number; code: string | null }> {
  return new Promise((resolve, reject) => {
    const req = request(
      { host: "127.0.0.1", port, method: "GET", path: "/check/v1/things", headers: ["Host", "keygate", "x-api-key", valueBytes.toString("latin1")], agent: false },
      (res) => {
        let text = "";
        res.setEncoding("utf8");
        res.on("data", (c: string) => (text += c));
        res.on("end", () => {
          let code: string | null = null;
          try {
            code = (JSON.parse(text) as { error: { code: string } }).error.code;
          } catch {
            code = null;
          }
          resolve({ status: res.statusCode ?? 0, code });
        });
      },
    );
    req.on("error", reject);
    req.end();
  });
}

/** A gRPC Check whose x-api-key value is these exact bytes (Envoy passes a client's bytes on). */
async function grpcWithRawKey(valueBytes: Buffer): Promise<{ status: number; code: string | null }> {
  // The generated message takes a JS string; bytes that are not UTF-8 are what check-request.ts
  // reads as U+FFFD, so the string is their lenient UTF-8 reading.
  const value = new TextDecoder("utf-8", { fatal: false, ignoreBOM: true }).decode(valueBytes);
  return checkOutcome(await kg.check(checkInit({ "x-api-key": value })));
}

const UNAUTHENTICATED = { status: 401, code: "UNAUTHENTICATED" };

describe("X-API-Key white space is judged alike on gRPC and HTTP", () => {
  beforeAll(async () => {
    kg = await startKeygate();
    key = (await kg.admin.createKey({ ownerId: "trim_owner", name: "trim" })).secret;
  });

  afterAll(async () => {
    await kg?.stop();
  });

  it("the plain key passes on both (control)", async () => {
    const bytes = Buffer.from(key, "latin1");
    expect(await grpcWithRawKey(bytes)).toEqual({ status: 200, code: null });
    expect(await httpWithRawKey(kg.ports.http, bytes)).toEqual({ status: 200, code: null });
    // HTTP's own OWS (SP, HTAB) around the value is not part of it on either entry point.
    const padded = Buffer.from(` \t${key} \t`, "latin1");
    expect(await grpcWithRawKey(padded)).toEqual({ status: 200, code: null });
    expect(await httpWithRawKey(kg.ports.http, padded)).toEqual({ status: 200, code: null });
  });

  const cases: Array<[string, () => Buffer]> = [
    ["key + UTF-8 NBSP (C2 A0)", () => Buffer.concat([Buffer.from(key, "latin1"), Buffer.from([0xc2, 0xa0])])],
    ["UTF-8 BOM (EF BB BF) + key", () => Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from(key, "latin1")])],
    ["key + U+2028 (E2 80 A8)", () => Buffer.concat([Buffer.from(key, "latin1"), Buffer.from([0xe2, 0x80, 0xa8])])],
    ["key + U+3000 ideographic space (E3 80 80)", () => Buffer.concat([Buffer.from(key, "latin1"), Buffer.from([0xe3, 0x80, 0x80])])],
    ["key + lone A0 byte", () => Buffer.concat([Buffer.from(key, "latin1"), Buffer.from([0xa0])])],
  ];

  for (const [name, make] of cases) {
    it(`${name}: refused (401) by gRPC Check and by the HTTP mode alike`, async () => {
      const bytes = make();
      const viaGrpc = await grpcWithRawKey(bytes);
      const viaHttp = await httpWithRawKey(kg.ports.http, bytes);
      expect({ grpc: viaGrpc, http: viaHttp }).toEqual({ grpc: UNAUTHENTICATED, http: UNAUTHENTICATED });
    });
  }
});
