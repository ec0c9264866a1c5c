import { describe, expect, it } from "vitest";
import { create, toBinary } from "@bufbuild/protobuf";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { decodeCheckRequest } from "../../src/authz/check-request.js";
import { CheckRequestSchema } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { retainedMiB } from "../harness/heap.js";

// The Check decoder keeps a process-wide canonical copy of the header names and
// context_extensions keys it reads (check-request.ts canonicalName), so that names repeating from
// request to request are added and compared as one string. It used to keep the first 1024
// distinct names of whatever length for the life of the process: 48 Checks with one distinct 512 KiB
// header name each pinned 22 MiB, 1024 of ~4 MiB ~4 GiB, and every later name went uncached.
// Names are read before anything is judged, so no key is needed. Now only names under 128 bytes
// (the slot cache's bound) are kept.

const MiB = 1024 * 1024;
const COUNT = 48;
/** Under Node's 1 MiB external-string threshold, so a kept name is on the V8 heap heapUsed counts. */
const NAME_BYTES = MiB / 2;

/**
 * COUNT encodings of `init(name)`, each with a distinct NAME_BYTES name starting with `prefix`
 * (one of its own for each test: a name the table already holds would not be kept again). The
 * names are written into copies of one encoding's bytes, never made as strings here: a string the
 * test held (or V8's table of property keys did) would be counted before the decode and hide
 * what the decoder keeps.
 */
function withDistinctNames(
  prefix: string,
  init: (name: string) => MessageInitShape<typeof CheckRequestSchema>,
): { messages: Uint8Array[]; nameOf: (i: number) => string } {
  const head = `${prefix}-`;
  const template = Buffer.from(toBinary(CheckRequestSchema, create(CheckRequestSchema, init(`${head}${"n".repeat(NAME_BYTES - head.length)}`))));
  const at = template.indexOf(`${head}nnnnnnnn`) + head.length;
  expect(at).toBeGreaterThan(head.length);
  const tag = (i: number): string => i.toString().padStart(8, "0");
  const messages = Array.from({ length: COUNT }, (_, i) => {
    const bytes = Buffer.from(template);
    bytes.write(tag(i), at, "latin1");
    return new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  });
  return { messages, nameOf: (i) => `${head}${tag(i)}${"n".repeat(NAME_BYTES - head.length - 8)}` };
}

describe("names a client makes up are not kept, security", () => {
  it("decoding Checks with 48 distinct 512 KiB header names keeps none of them", () => {
    const { messages, nameOf } = withDistinctNames("x", (name) => ({ attributes: { request: { http: { method: "GET", path: "/", headers: { [name]: "v" } } } } }));
    // The name is read as it was sent (checked once, before the measured window).
    expect(decodeCheckRequest(messages[COUNT - 1] as Uint8Array).attributes?.request?.http?.headers.get(nameOf(COUNT - 1))).toBe("v");
    const kept = retainedMiB(() => {
      for (const bytes of messages) decodeCheckRequest(bytes);
    });
    console.log("observed", JSON.stringify({ names: COUNT, nameKiB: NAME_BYTES / 1024, retainedMiB: kept.toFixed(1) }));
    // All of them kept would be 24 MiB; a few MiB of slack for whatever else the GC leaves.
    expect(kept).toBeLessThan(8);
  }, 60_000);

  it("decoding Checks with 48 distinct 512 KiB context_extensions keys keeps none of them", () => {
    const { messages, nameOf } = withDistinctNames("y", (name) => ({ attributes: { contextExtensions: { [name]: "v" } } }));
    expect(decodeCheckRequest(messages[COUNT - 1] as Uint8Array).attributes?.contextExtensions[nameOf(COUNT - 1)]).toBe("v");
    const kept = retainedMiB(() => {
      for (const bytes of messages) decodeCheckRequest(bytes);
    });
    console.log("observed", JSON.stringify({ keys: COUNT, keyKiB: NAME_BYTES / 1024, retainedMiB: kept.toFixed(1) }));
    expect(kept).toBeLessThan(8);
  }, 60_000);
});
