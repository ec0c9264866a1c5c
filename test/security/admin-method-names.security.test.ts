import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { stringify } from "yaml";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { METHOD_PERMISSIONS } from "../../src/admin/permissions.js";
import { KeyAdmin } from "../../src/gen/keygate/v1/key_admin_pb.js";
import { ADMIN_TOKEN, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// The admin server finds the permission a call needs by the method name in its path, before the
// body is read. A name that is a member of Object.prototype ("constructor", "toString",
// "__proto__") must find no permission, as any name KeyAdmin does not have: answered 404 as
// Connect answers an unknown method, never refused PERMISSION_DENIED quoting
// `function Object() { [native code] }`, whatever the token may do.

const PROTOTYPE_NAMES = ["constructor", "toString", "__proto__", "hasOwnProperty", "valueOf", "isPrototypeOf", "propertyIsEnumerable", "toLocaleString", "__defineGetter__", "__lookupSetter__"];
const READER_TOKEN = "keys-reader-token-0123456789abcdefg";

let kg: TestKeygate;
let tokensDir: string;
beforeAll(async () => {
  tokensDir = mkdtempSync(join(tmpdir(), "keygate-tokens-"));
  const path = join(tokensDir, "admin-tokens.yaml");
  writeFileSync(path, stringify({ tokens: [{ name: "keys-reader", token: READER_TOKEN, permissions: ["keys:read"] }] }));
  kg = await startKeygate({ env: { KEYGATE_ADMIN_TOKENS_FILE: path } });
});
afterAll(async () => {
  await kg.stop();
  rmSync(tokensDir, { recursive: true, force: true });
});

/** A POST to /keygate.v1.KeyAdmin/<method>: its status and body. */
async function post(method: string, token: string, contentType = "application/json"): Promise<{ status: number; body: string }> {
  const res = await fetch(`http://127.0.0.1:${kg.ports.admin}/keygate.v1.KeyAdmin/${method}`, {
    method: "POST",
    headers: { "content-type": contentType, authorization: `Bearer ${token}` },
    body: "{}",
  });
  return { status: res.status, body: await res.text() };
}

describe("admin method names security: Object.prototype members are unknown methods", () => {
  it("with a token that may do everything, and with one that may only read keys, each is answered as an unknown method", async () => {
    const seen = [];
    for (const [tokenName, token] of [["full", ADMIN_TOKEN], ["keys-reader", READER_TOKEN]] as const) {
      for (const contentType of ["application/json", "application/grpc+json"]) {
        const unknown = await post("NoSuchMethod", token, contentType);
        expect(unknown).toEqual({ status: 404, body: "" });
        for (const method of PROTOTYPE_NAMES) seen.push({ tokenName, contentType, method, ...(await post(method, token, contentType)) });
      }
    }
    const expected = (["full", "keys-reader"] as const).flatMap((tokenName) =>
      ["application/json", "application/grpc+json"].flatMap((contentType) => PROTOTYPE_NAMES.map((method) => ({ tokenName, contentType, method, status: 404, body: "" }))),
    );
    expect(seen).toEqual(expected);
    expect(kg.logLines.filter((line) => line.includes("missing permission"))).toEqual([]);
  });

  it("the permission table holds exactly KeyAdmin's methods, and nothing for a prototype member", () => {
    expect([...METHOD_PERMISSIONS.keys()].sort()).toEqual(KeyAdmin.methods.map((method) => method.name).sort());
    expect(PROTOTYPE_NAMES.map((name) => METHOD_PERMISSIONS.get(name))).toEqual(PROTOTYPE_NAMES.map(() => undefined));
  });

  it("happy: a method the token lacks is still refused 403 naming the permission, before its body is read", async () => {
    const refused = await post("CreateKey", READER_TOKEN);
    expect({ status: refused.status, body: JSON.parse(refused.body) as unknown }).toEqual({
      status: 403,
      body: { code: "permission_denied", message: 'the admin token "keys-reader" lacks the "keys:write" permission, which CreateKey needs' },
    });
  });
});
