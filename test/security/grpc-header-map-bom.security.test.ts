import { create } from "@bufbuild/protobuf";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { HeaderMapSchema } from "../../src/gen/envoy/config/core/v3/base_pb.js";
import { checkInit, checkOutcome, httpCheck, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// Envoy's encode_raw_headers form (header_map, the value's bytes in raw_value) keeps a leading
// UTF-8 BOM in the value, as `headers` and the HTTP mode do: BOM + key is not a key, 401 on every
// entry point (credential-trim-parity). A default TextDecoder would strip the BOM and allow it.

let kg: TestKeygate;
let key: string;

function rawHeaderCheck(valueBytes: Uint8Array) {
  const headerMap = create(HeaderMapSchema, { headers: [{ key: "x-api-key", rawValue: valueBytes }] });
  return { attributes: { request: { http: { id: "req-bom", method: "GET", path: "/v1/things", host: "api.example.com", headerMap } } } };
}

describe("header_map raw_value with a UTF-8 BOM before the key", () => {
  beforeAll(async () => {
    kg = await startKeygate();
    key = (await kg.admin.createKey({ ownerId: "bom_owner", name: "bom" })).secret;
  });
  afterAll(async () => {
    await kg?.stop();
  });

  it("control: the plain key in header_map is allowed", async () => {
    expect(checkOutcome(await kg.check(rawHeaderCheck(new TextEncoder().encode(key))))).toEqual({ status: 200, code: null });
  });

  it("control: BOM + key in `headers` is refused 401", async () => {
    expect(checkOutcome(await kg.check(checkInit({ "x-api-key": `\uFEFF${key}` })))).toEqual({ status: 401, code: "UNAUTHENTICATED" });
  });

  it("BOM + key in header_map raw_value is refused 401 like `headers` and the HTTP mode", async () => {
    const bytes = Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from(key, "latin1")]);
    const http = await httpCheck(kg.ports.http, "/check/v1/things", { "x-api-key": bytes.toString("latin1") });
    const grpc = checkOutcome(await kg.check(rawHeaderCheck(bytes)));
    expect({ grpcHeaderMap: grpc, httpStatus: http.status }).toEqual({ grpcHeaderMap: { status: 401, code: "UNAUTHENTICATED" }, httpStatus: 401 });
  });
});
