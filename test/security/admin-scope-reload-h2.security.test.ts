import { mkdtempSync, rmSync, writeFileSync, renameSync } from "node:fs";
import { connect } from "node:http2";
import type { ClientHttp2Session } from "node:http2";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { stringify } from "yaml";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { grpcFrame, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

const TOKEN = "h2-reload-token-0123456789abcdefghijk";
let kg: TestKeygate;
let dir: string;
let path: string;
beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), "keygate-tokens-"));
  path = join(dir, "admin-tokens.yaml");
  writeFileSync(path, stringify({ tokens: [{ name: "h2", token: TOKEN, permissions: ["keys:read", "keys:write"] }] }));
  kg = await startKeygate({ env: { KEYGATE_ADMIN_TOKENS_FILE: path } });
});
afterAll(async () => {
  await kg.stop();
  rmSync(dir, { recursive: true, force: true });
});

function call(session: ClientHttp2Session, method: string, body: unknown, authorization: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const stream = session.request({ ":method": "POST", ":path": `/keygate.v1.KeyAdmin/${method}`, "content-type": "application/grpc+json", te: "trailers", authorization });
    let headers: Record<string, unknown> = {};
    stream.on("response", (h) => (headers = h));
    stream.on("trailers", (t) => (headers = { ...headers, ...t }));
    stream.on("data", () => undefined);
    stream.on("error", reject);
    stream.on("close", () => resolve(String(headers["grpc-status"]) + (headers["grpc-status"] === "0" ? "" : " " + decodeURIComponent(String(headers["grpc-message"])))));
    stream.end(grpcFrame(JSON.stringify(body)));
  });
}

describe("h2 session reuse across a reload", () => {
  it("a removed or narrowed token fails on a session opened before the reload", async () => {
    const session = connect(`http://127.0.0.1:${kg.ports.admin}`);
    try {
      expect(await call(session, "ListKeys", { ownerId: "o" }, `Bearer ${TOKEN}`)).toBe("0");
      writeFileSync(join(dir, "next.yaml"), stringify({ tokens: [{ name: "h2", token: TOKEN, permissions: ["keys:read"], owners: ["other"] }] }));
      renameSync(join(dir, "next.yaml"), path);
      expect(kg.app.reload().adminTokens).toBe("applied");
      expect(await call(session, "CreateKey", { ownerId: "o", name: "n" }, `Bearer ${TOKEN}`)).toMatch(/^7 /);
      expect(await call(session, "ListKeys", { ownerId: "o" }, `Bearer ${TOKEN}`)).toMatch(/^7 /);
      writeFileSync(join(dir, "next.yaml"), stringify({ tokens: [{ name: "other", token: "x".repeat(30), permissions: ["keys:read"] }] }));
      renameSync(join(dir, "next.yaml"), path);
      expect(kg.app.reload().adminTokens).toBe("applied");
      expect(await call(session, "ListKeys", { ownerId: "o" }, `Bearer ${TOKEN}`)).toMatch(/^16 /);
    } finally {
      session.close();
    }
  });
});
