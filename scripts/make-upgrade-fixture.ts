/**
 * Makes the data an earlier keygate release wrote, for test/integration/upgrade.test.ts: it runs
 * that release's own `dist/cli.js serve`, embedded (SQLite) and on a MongoDB-wire server, drives
 * it through KeyAdmin and Check, stops it with SIGTERM (which flushes usage), and keeps what it
 * wrote: the data directory, a dump of every MongoDB collection, and what the test should find.
 *
 *   git worktree add /tmp/keygate-1dffb08 1dffb08
 *   (cd /tmp/keygate-1dffb08 && npm ci && npm run build)
 *   npx tsx scripts/make-upgrade-fixture.ts /tmp/keygate-1dffb08 test/fixtures/upgrade/1dffb08
 *
 * The secrets in the fixture are test keys of a throwaway pepper; they open nothing else.
 */
import { spawn } from "node:child_process";
import { execFileSync } from "node:child_process";
import { copyFileSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { create, toBinary } from "@bufbuild/protobuf";
import mongoose from "mongoose";
import { CheckRequestSchema } from "../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { listeningPorts } from "../test/harness/process.js";
import { startMongoWire } from "../test/harness/mongo-wire.js";

const ADMIN_TOKEN = "kgadm_upgrade_fixture_0123456789abcdef";
const PEPPER = "upgrade-fixture-pepper-0123456789abcdefghijklmnop";

interface Running {
  ports: { grpc: number; http: number; admin: number };
  stop(): Promise<number | null>;
}

function startRelease(releaseDir: string, env: Record<string, string>): Promise<Running> {
  const childEnv: NodeJS.ProcessEnv = {};
  for (const [name, value] of Object.entries(process.env)) if (!name.startsWith("KEYGATE_")) childEnv[name] = value;
  Object.assign(childEnv, { KEYGATE_HOST: "127.0.0.1", KEYGATE_GRPC_PORT: "0", KEYGATE_HTTP_AUTHZ_PORT: "0", KEYGATE_ADMIN_PORT: "0", KEYGATE_ADMIN_TOKENS: ADMIN_TOKEN, ...env });
  const child = spawn(process.execPath, [join(releaseDir, "dist/cli.js"), "serve"], { cwd: releaseDir, env: childEnv, stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  let err = "";
  child.stdout.on("data", (chunk: Buffer) => (out += chunk.toString()));
  child.stderr.on("data", (chunk: Buffer) => (err += chunk.toString()));
  const exit = new Promise<number | null>((done) => child.on("exit", (code) => done(code)));
  return new Promise((ready, fail) => {
    const deadline = setTimeout(() => fail(new Error(`the release did not start:\n${out}\n${err}`)), 60_000);
    const poll = setInterval(() => {
      const ports = listeningPorts(out);
      if (ports === null) return;
      clearInterval(poll);
      clearTimeout(deadline);
      ready({
        ports,
        stop: () => {
          child.kill("SIGTERM");
          return exit;
        },
      });
    }, 50);
  });
}

async function admin(port: number, method: string, body: unknown): Promise<Record<string, unknown>> {
  const res = await fetch(`http://127.0.0.1:${port}/keygate.v1.KeyAdmin/${method}`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${ADMIN_TOKEN}` },
    body: JSON.stringify(body),
  });
  const json = (await res.json()) as Record<string, unknown>;
  if (res.status !== 200) throw new Error(`${method}: HTTP ${res.status} ${JSON.stringify(json)}`);
  return json;
}

/** One gRPC Check through h2 (the same bytes every release accepts); returns the HTTP status Envoy would send. */
async function check(port: number, secret: string): Promise<number> {
  const { connect } = await import("node:http2");
  const message = toBinary(
    CheckRequestSchema,
    create(CheckRequestSchema, { attributes: { request: { http: { id: "fixture", method: "GET", path: "/v1/things", host: "api.example.com", headers: { authorization: `Bearer ${secret}` } } } } }),
  );
  const frame = Buffer.alloc(5 + message.length);
  frame.writeUInt32BE(message.length, 1);
  frame.set(message, 5);
  const session = connect(`http://127.0.0.1:${port}`);
  try {
    const body = await new Promise<Buffer>((done, fail) => {
      const stream = session.request({ ":method": "POST", ":path": "/envoy.service.auth.v3.Authorization/Check", "content-type": "application/grpc", te: "trailers" });
      const chunks: Buffer[] = [];
      stream.on("data", (chunk: Buffer) => chunks.push(chunk));
      stream.on("end", () => done(Buffer.concat(chunks)));
      stream.on("error", fail);
      stream.end(frame);
    });
    const { fromBinary } = await import("@bufbuild/protobuf");
    const { CheckResponseSchema } = await import("../src/gen/envoy/service/auth/v3/external_auth_pb.js");
    const response = fromBinary(CheckResponseSchema, body.subarray(5));
    return response.httpResponse.case === "deniedResponse" ? (response.httpResponse.value.status?.code ?? 0) : 200;
  } finally {
    session.close();
  }
}

interface Written {
  madeAtMs: number;
  day: string;
  keys: Record<string, { id: string; secret: string }>;
  usage: { ownerId: string; keyId: string; allowed: number };
  credits: { ownerId: string; added: number };
  auditEvents: number;
}

/** The same story on every store: keys in each state, usage, credits, and the audit they leave. */
async function story(ports: Running["ports"]): Promise<Omit<Written, "auditEvents">> {
  const madeAtMs = Date.now();
  const owner = "acct_upgrade";
  await admin(ports.admin, "UpsertAccount", { ownerId: owner, plan: "business" });
  const create = async (name: string, extra: Record<string, unknown> = {}): Promise<{ id: string; secret: string }> => {
    const r = await admin(ports.admin, "CreateKey", { ownerId: owner, name, ...extra });
    return { id: (r["key"] as { id: string }).id, secret: r["secret"] as string };
  };
  const active = await create("active");
  const rotating = await create("rotating");
  const rotated = await admin(ports.admin, "RotateKey", { id: rotating.id, graceDays: 7 });
  const successor = { id: (rotated["key"] as { id: string }).id, secret: rotated["secret"] as string };
  const revoked = await create("revoked");
  await admin(ports.admin, "RevokeKey", { id: revoked.id, reason: "leaked" });
  const expiring = await create("expiring", { expiresAt: new Date(madeAtMs + 10 * 60_000).toISOString() });
  const lapsedOwner = "acct_lapsed";
  await admin(ports.admin, "UpsertAccount", { ownerId: lapsedOwner, plan: "basic" });
  const lapsedR = await admin(ports.admin, "CreateKey", { ownerId: lapsedOwner, name: "lapsed" });
  const lapsed = { id: (lapsedR["key"] as { id: string }).id, secret: lapsedR["secret"] as string };
  await admin(ports.admin, "UpsertAccount", { ownerId: lapsedOwner, subscriptionStatus: "canceled" });
  await admin(ports.admin, "AddCredits", { ownerId: owner, amount: "250", reason: "order fixture-1" });
  const allowed = 5;
  for (let i = 0; i < allowed; i++) {
    const status = await check(ports.grpc, active.secret);
    if (status !== 200) throw new Error(`Check of the active key answered ${status}`);
  }
  return {
    madeAtMs,
    day: new Date(madeAtMs).toISOString().slice(0, 10),
    keys: { active, inGrace: rotating, successor, revoked, expiring, lapsed },
    usage: { ownerId: owner, keyId: active.id, allowed },
    credits: { ownerId: owner, added: 250 },
  };
}

async function auditCount(port: number): Promise<number> {
  let total = 0;
  let pageToken = "";
  do {
    const page = await admin(port, "ListAuditEvents", { pageSize: 100, pageToken });
    total += ((page["events"] as unknown[] | undefined) ?? []).length;
    pageToken = (page["nextPageToken"] as string | undefined) ?? "";
  } while (pageToken !== "");
  return total;
}

async function main(): Promise<void> {
  const [releaseArg, outArg] = process.argv.slice(2);
  if (releaseArg === undefined || outArg === undefined) throw new Error("usage: make-upgrade-fixture.ts <built release checkout> <output dir>");
  const releaseDir = resolve(releaseArg);
  const out = resolve(outArg);
  const commit = execFileSync("git", ["-C", releaseDir, "rev-parse", "HEAD"], { encoding: "utf8" }).trim();
  rmSync(out, { recursive: true, force: true });
  mkdirSync(out, { recursive: true });

  // Embedded: the data directory as the release left it (SIGTERM checkpoints the WAL).
  const dataDir = mkdtempSync(join(tmpdir(), "keygate-fixture-"));
  const embedded = await startRelease(releaseDir, { KEYGATE_DATA_DIR: dataDir, KEYGATE_PEPPER: PEPPER });
  const sqliteStory = await story(embedded.ports);
  // Read before the stop: the audit trail is written synchronously, usage on the flush at SIGTERM.
  const sqliteAudit = await auditCount(embedded.ports.admin);
  if ((await embedded.stop()) !== 0) throw new Error("the release did not exit 0 on SIGTERM");
  mkdirSync(join(out, "sqlite"), { recursive: true });
  copyFileSync(join(dataDir, "keygate.db"), join(out, "sqlite/keygate.db"));
  rmSync(dataDir, { recursive: true, force: true });

  // MongoDB: every collection of the database, as canonical Extended JSON.
  const mongo = await startMongoWire();
  try {
    const uri = `${mongo.uri.replace(/\/[^/]*$/, "")}/keygate_fixture`;
    const release = await startRelease(releaseDir, { KEYGATE_MONGODB_URI: uri, KEYGATE_PEPPER: PEPPER });
    const mongoStory = await story(release.ports);
    const mongoAudit = await auditCount(release.ports.admin);
    if ((await release.stop()) !== 0) throw new Error("the release did not exit 0 on SIGTERM");
    const client = await mongoose.mongo.MongoClient.connect(uri);
    try {
      const db = client.db();
      const dump: Record<string, unknown[]> = {};
      for (const { name } of await db.listCollections().toArray()) dump[name] = await db.collection(name).find().toArray();
      writeFileSync(join(out, "mongo.json"), `${mongoose.mongo.BSON.EJSON.stringify(dump, undefined, 1, { relaxed: false })}\n`);
    } finally {
      await client.close();
    }
    writeFileSync(join(out, "mongo-expected.json"), `${JSON.stringify({ ...mongoStory, auditEvents: mongoAudit }, null, 2)}\n`);
  } finally {
    await mongo.stop();
  }
  writeFileSync(join(out, "sqlite-expected.json"), `${JSON.stringify({ ...sqliteStory, auditEvents: sqliteAudit }, null, 2)}\n`);
  writeFileSync(join(out, "release.json"), `${JSON.stringify({ commit, pepper: PEPPER, adminToken: ADMIN_TOKEN, madeWith: "scripts/make-upgrade-fixture.ts" }, null, 2)}\n`);
  process.stdout.write(`fixture of ${commit} written to ${out}\n`);
}

await main();
