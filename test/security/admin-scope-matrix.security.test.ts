import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { connect } from "node:http2";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { stringify } from "yaml";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { PERMISSIONS } from "../../src/admin/permissions.js";
import { grpcFrame, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// Every KeyAdmin method × every single-permission token × Connect JSON, gRPC and gRPC-Web:
// allowed exactly when README's table says so.

const README_TABLE: Record<string, string> = {
  CreateKey: "keys:write", UpdateKey: "keys:write", RevokeKey: "keys:write", RotateKey: "keys:write", DisableKey: "keys:write", EnableKey: "keys:write",
  GetKey: "keys:read", ListKeys: "keys:read", UpsertAccount: "accounts:write", AddCredits: "accounts:write", GetAccount: "accounts:read",
  GetUsage: "usage:read", ChargeUsage: "usage:write", VerifyKey: "verify", ListAuditEvents: "audit:read",
};
const NOKEY = "key_01ARZ3NDEKTSV4RRFFQ69G5FAV";
const BODIES: Record<string, unknown> = {
  CreateKey: { ownerId: "m1", name: "k" }, UpdateKey: { id: NOKEY, name: "n" }, RevokeKey: { id: NOKEY }, RotateKey: { id: NOKEY },
  DisableKey: { id: NOKEY }, EnableKey: { id: NOKEY }, GetKey: { id: NOKEY }, ListKeys: { ownerId: "m1" },
  UpsertAccount: { ownerId: "m1" }, AddCredits: { ownerId: "nobody", amount: "1", reason: "x" }, GetAccount: { ownerId: "m1" },
  GetUsage: { ownerId: "m1", from: "2026-12-01", to: "2026-12-02" }, ChargeUsage: { ownerId: "nobody", cost: "0", idempotencyKey: "i" },
  VerifyKey: { secret: "not-a-key" }, ListAuditEvents: {},
};
const tokenOf = (p: string): string => `tok-${p.replace(":", "-")}-0123456789abcdefghijklmn`;

let kg: TestKeygate;
let dir: string;
beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), "keygate-tokens-"));
  const path = join(dir, "admin-tokens.yaml");
  writeFileSync(path, stringify({ tokens: PERMISSIONS.map((p) => ({ name: p.replace(":", "-"), token: tokenOf(p), permissions: [p] })) }));
  kg = await startKeygate({ env: { KEYGATE_ADMIN_TOKENS_FILE: path } });
});
afterAll(async () => {
  await kg.stop();
  rmSync(dir, { recursive: true, force: true });
});

async function connectJson(method: string, body: unknown, token: string): Promise<string> {
  const res = await fetch(`http://127.0.0.1:${kg.ports.admin}/keygate.v1.KeyAdmin/${method}`, {
    method: "POST", headers: { "content-type": "application/json", authorization: `Bearer ${token}` }, body: JSON.stringify(body),
  });
  const json = (await res.json()) as { code?: string };
  return res.status === 200 ? "ok" : (json.code ?? String(res.status));
}
const GRPC_NAMES: Record<string, string> = { "0": "ok", "7": "permission_denied" };
async function grpc(method: string, body: unknown, token: string): Promise<string> {
  const session = connect(`http://127.0.0.1:${kg.ports.admin}`);
  try {
    return await new Promise<string>((resolve, reject) => {
      const stream = session.request({ ":method": "POST", ":path": `/keygate.v1.KeyAdmin/${method}`, "content-type": "application/grpc+json", te: "trailers", authorization: `Bearer ${token}` });
      let headers: Record<string, unknown> = {};
      stream.on("response", (h) => (headers = h));
      stream.on("trailers", (t) => (headers = { ...headers, ...t }));
      stream.on("data", () => undefined);
      stream.on("error", reject);
      stream.on("close", () => { const s = String(headers["grpc-status"]); resolve(GRPC_NAMES[s] ?? `grpc-${s}`); });
      stream.end(grpcFrame(JSON.stringify(body)));
    });
  } finally {
    session.close();
  }
}
async function grpcWeb(method: string, body: unknown, token: string): Promise<string> {
  const res = await fetch(`http://127.0.0.1:${kg.ports.admin}/keygate.v1.KeyAdmin/${method}`, {
    method: "POST", headers: { "content-type": "application/grpc-web+json", authorization: `Bearer ${token}` }, body: grpcFrame(JSON.stringify(body)),
  });
  const header = res.headers.get("grpc-status");
  const text = Buffer.from(await res.arrayBuffer()).toString("latin1");
  const s = header ?? /grpc-status:\s*(\d+)/.exec(text)?.[1] ?? "?";
  return GRPC_NAMES[s] ?? `grpc-${s}`;
}

describe("scopes matrix", () => {
  it("each method is allowed exactly for the permission README names, on all three protocols", async () => {
    const wrong: string[] = [];
    for (const [proto, call] of [["connect", connectJson], ["grpc", grpc], ["grpc-web", grpcWeb]] as const) {
      for (const method of Object.keys(README_TABLE)) {
        for (const p of PERMISSIONS) {
          const got = await call(method, BODIES[method], tokenOf(p));
          const denied = got === "permission_denied";
          if (denied !== (README_TABLE[method] !== p)) wrong.push(`${proto} ${method} as ${p}: ${got}`);
        }
      }
      // VerifyKey with a cost needs verify and usage:write.
      const withCost = { secret: "not-a-key", cost: "1", idempotencyKey: "v" };
      for (const p of PERMISSIONS) {
        const got = await call("VerifyKey", withCost, tokenOf(p));
        if (got !== "permission_denied") wrong.push(`${proto} VerifyKey+cost as ${p}: ${got}`);
      }
    }
    expect(wrong).toEqual([]);
  }, 600_000);
});
