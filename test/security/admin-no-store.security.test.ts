import { connect } from "node:http2";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createClient } from "@connectrpc/connect";
import type { Client, Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-node";
import { KeyAdmin } from "../../src/gen/keygate/v1/key_admin_pb.js";
import { ADMIN_TOKEN, grpcFrame, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// CreateKey and RotateKey answer with a key's secret, shown once. A cache between the caller and
// keygate (a proxy, a browser fronting gRPC-Web) must never keep it: every KeyAdmin answer, on
// every protocol and whatever its outcome, says "Cache-Control: no-store".

let kg: TestKeygate;
beforeAll(async () => {
  kg = await startKeygate();
  await kg.admin.upsertAccount({ ownerId: "user_ns", plan: "business" });
});
afterAll(async () => {
  await kg.stop();
});

/** The response headers of a Connect JSON call to `method`, with `token` (or none). */
async function connectJson(method: string, body: unknown, token: string | null): Promise<{ status: number; cacheControl: string | null }> {
  const headers: Record<string, string> = { "content-type": "application/json" };
  if (token !== null) headers["authorization"] = `Bearer ${token}`;
  const res = await fetch(`http://127.0.0.1:${kg.ports.admin}/keygate.v1.KeyAdmin/${method}`, { method: "POST", headers, body: JSON.stringify(body) });
  await res.arrayBuffer();
  return { status: res.status, cacheControl: res.headers.get("cache-control") };
}

/** A gRPC-Web client (connect-node's transport) that records each answer's Cache-Control. */
function grpcWebClient(seen: (string | null)[]): Client<typeof KeyAdmin> {
  const recorded: Interceptor = (next) => async (req) => {
    req.header.set("authorization", `Bearer ${ADMIN_TOKEN}`);
    const res = await next(req);
    seen.push(res.header.get("cache-control"));
    return res;
  };
  return createClient(KeyAdmin, createGrpcWebTransport({ baseUrl: `http://127.0.0.1:${kg.ports.admin}`, httpVersion: "1.1", interceptors: [recorded] }));
}

/** The :status, grpc-status and cache-control of a gRPC JSON call over HTTP/2, with `token` (or none). */
async function grpcOverHttp2(token: string | null): Promise<{ status: unknown; grpcStatus: unknown; cacheControl: unknown }> {
  const session = connect(`http://127.0.0.1:${kg.ports.admin}`);
  try {
    return await new Promise((resolve, reject) => {
      const headers: Record<string, string> = { ":method": "POST", ":path": "/keygate.v1.KeyAdmin/GetAccount", "content-type": "application/grpc+json", te: "trailers" };
      if (token !== null) headers["authorization"] = `Bearer ${token}`;
      const stream = session.request(headers);
      let answer: Record<string, unknown> = {};
      stream.on("response", (h) => (answer = h));
      stream.on("trailers", (t) => (answer = { ...answer, ...t }));
      stream.on("data", () => undefined);
      stream.on("error", reject);
      stream.on("close", () => resolve({ status: answer[":status"], grpcStatus: answer["grpc-status"], cacheControl: answer["cache-control"] }));
      stream.end(grpcFrame(JSON.stringify({ ownerId: "user_ns" })));
    });
  } finally {
    session.close();
  }
}

describe("admin no-store security: KeyAdmin answers are never cached", () => {
  it("CreateKey over Connect JSON: the secret's answer says no-store", async () => {
    expect(await connectJson("CreateKey", { ownerId: "user_ns", name: "json" }, ADMIN_TOKEN)).toEqual({ status: 200, cacheControl: "no-store" });
  });

  it("CreateKey and RotateKey over gRPC-Web: both answers say no-store", async () => {
    const seen: (string | null)[] = [];
    const client = grpcWebClient(seen);
    const created = await client.createKey({ ownerId: "user_ns", name: "web" });
    await client.rotateKey({ id: created.key?.id ?? "" });
    expect(seen).toEqual(["no-store", "no-store"]);
  });

  it("error: a refused call (no token, an unknown scope) says no-store too", async () => {
    expect([await connectJson("CreateKey", { ownerId: "user_ns", name: "x" }, null), await connectJson("CreateKey", { ownerId: "user_ns", name: "x", scopes: ["nope"] }, ADMIN_TOKEN)]).toEqual([
      { status: 401, cacheControl: "no-store" },
      { status: 400, cacheControl: "no-store" },
    ]);
  });

  it("error: a gRPC-Web refusal carries it in its headers", async () => {
    const res = await fetch(`http://127.0.0.1:${kg.ports.admin}/keygate.v1.KeyAdmin/CreateKey`, { method: "POST", headers: { "content-type": "application/grpc-web+json" }, body: "" });
    await res.arrayBuffer();
    expect({ grpcStatus: res.headers.get("grpc-status"), cacheControl: res.headers.get("cache-control") }).toEqual({ grpcStatus: "16", cacheControl: "no-store" });
  });

  it("HTTP/2: an admitted gRPC call and one refused before its body is read (answered on the stream) both say no-store", async () => {
    expect([await grpcOverHttp2(ADMIN_TOKEN), await grpcOverHttp2(null)]).toEqual([
      { status: 200, grpcStatus: "0", cacheControl: "no-store" },
      { status: 200, grpcStatus: "16", cacheControl: "no-store" },
    ]);
  });
});
