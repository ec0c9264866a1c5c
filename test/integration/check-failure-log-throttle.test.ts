import { create, toBinary } from "@bufbuild/protobuf";
import { status as GrpcStatus } from "@grpc/grpc-js";
import type { ServiceError } from "@grpc/grpc-js";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { CheckBudgetExceededError } from "../../src/authz/budget.js";
import type { CheckInput, Decision } from "../../src/authz/pipeline.js";
import { CheckRequestSchema } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { KeyFormat } from "../../src/keys/key-format.js";
import { createAuthzCore } from "../../src/server/grpc-authz.js";
import type { GrpcAuthzDeps, StartedServer } from "../../src/server/grpc-authz.js";
import { createHttpAuthzServer } from "../../src/server/http-authz.js";
import { Metrics } from "../../src/server/metrics.js";
import { Readiness } from "../../src/server/readiness.js";
import { StoreUnavailableError } from "../../src/store/errors.js";
import { collectingLogger } from "../harness/authz-core.js";
import { checkInit, checkOutcome, startKeygate, TEST_POLICY } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";
import { startTcpRelay } from "../harness/tcp-relay.js";
import type { TcpRelay } from "../harness/tcp-relay.js";

// During a store outage every Check of a key no cache holds is answered UNAVAILABLE, and anyone
// can send such keys: a made-up key with a valid checksum needs no secret. Each used to write one
// warn line "check could not be decided" with the error's stack (about 550 bytes), unthrottled,
// each a synchronous write on the event loop that cached keys' Checks waited behind. Both modes
// now write it once a minute for each kind of error (its name and message), with the count since,
// as the other lines a client can cause (L2 failures, bad per-route settings); a defect (INTERNAL)
// is still logged every time, with the request id KeygateCheckErrors' runbook asks for
// (test/integration/check-defect-counted.test.ts). keygate_checks_total counts every Check.

const MSG = "check could not be decided";

interface LogLine {
  level: number;
  msg: string;
  mode?: string;
  since?: number;
  requestId?: string;
  err?: { type?: string; message?: string };
}

/** The "check could not be decided" lines among `lines`, as level, mode, since, request id and error. */
function undecidedLines(lines: readonly string[]): Array<{ level: number; mode?: string; since?: number; requestId?: string; error: string }> {
  return lines
    .map((line) => JSON.parse(line) as LogLine)
    .filter((line) => line.msg === MSG)
    .map(({ level, mode, since, requestId, err }) => ({ level, mode, since, requestId, error: `${err?.type ?? "?"}: ${err?.message ?? "?"}` }));
}

/** keygate_checks_total's cells as "mode reason" → count. */
async function counted(metrics: Metrics): Promise<Record<string, number>> {
  const values = (await metrics.registry.getSingleMetric("keygate_checks_total")?.get())?.values ?? [];
  return Object.fromEntries(values.map((v) => [`${String(v.labels["mode"])} ${String(v.labels["reason"])}`, v.value]));
}

/** How a FailingPipeline fails a Check: an outage (two kinds of error) or a defect. */
type Fail = "store" | "budget" | "defect";

/** Fails every Check as its x-test-fail header says, later (as a backend's failure arrives). */
class FailingPipeline {
  decide(input: CheckInput): Promise<Decision> {
    const kind = input.headers.get("x-test-fail");
    if (kind === "store") return Promise.reject(new StoreUnavailableError("the store did not answer"));
    if (kind === "budget") return Promise.reject(new CheckBudgetExceededError(150));
    return Promise.reject(new TypeError("Cannot read properties of undefined (reading 'scopes')"));
  }
}

/** One mode's entry point in process, over FailingPipeline, with a logger and a log clock the test holds. */
interface Entry {
  /** Asks one Check; resolves with whether it was answered UNAVAILABLE. */
  ask(fail: Fail, requestId: string): Promise<boolean>;
  metrics: Metrics;
  lines: string[];
  clock: { ms: number };
}

const running: StartedServer[] = [];

afterEach(async () => {
  for (const server of running.splice(0)) await server.stop(0);
});

/** What both modes' entry points are built from, and what the test reads of them. */
function parts(): Omit<Entry, "ask"> & { deps: Pick<GrpcAuthzDeps, "pipeline" | "readiness" | "metrics" | "logger" | "nowMs" | "logClockMs"> } {
  const { logger, lines } = collectingLogger();
  const clock = { ms: 0 };
  const readiness = new Readiness();
  readiness.setReady(true);
  const metrics = new Metrics({ defaultMetrics: false });
  const deps = { pipeline: new FailingPipeline(), readiness, metrics, logger, nowMs: () => Date.now(), logClockMs: () => clock.ms };
  return { metrics, lines, clock, deps };
}

/** The gRPC mode's core, as both engines run it (the engine only moves bytes and statuses). */
function grpcEntry(): Entry {
  const { deps, ...rest } = parts();
  const core = createAuthzCore(deps, false);
  const ask = (fail: Fail, requestId: string): Promise<boolean> =>
    new Promise((resolve) => {
      const bytes = toBinary(CheckRequestSchema, create(CheckRequestSchema, checkInit({ "x-test-fail": fail, "x-request-id": requestId })));
      core.check(core.decodeCheck(bytes), undefined, (_target, answer) => resolve(answer === null));
    });
  return { ask, ...rest };
}

/** The HTTP mode's server on 127.0.0.1:0. */
async function httpEntry(): Promise<Entry> {
  const { deps, ...rest } = parts();
  const server = await createHttpAuthzServer({
    ...deps,
    proxy: "envoy",
    limits: { headersTimeoutMs: 10_000, requestTimeoutMs: 30_000, idleTimeoutMs: 60_000, maxConnections: 1000 },
  }).start("127.0.0.1", 0);
  running.push(server);
  const ask = async (fail: Fail, requestId: string): Promise<boolean> => {
    const response = await fetch(`http://127.0.0.1:${server.port}/check/v1/decks`, { headers: { "x-test-fail": fail, "x-request-id": requestId } });
    await response.text();
    return response.status === 503;
  };
  return { ask, ...rest };
}

/** Asks `count` Checks failing as `fail` at once; resolves with how many were answered UNAVAILABLE. */
async function askMany(entry: Entry, fail: Fail, count: number, idPrefix: string): Promise<number> {
  const answers = await Promise.all(Array.from({ length: count }, (_, i) => entry.ask(fail, `${idPrefix}-${i}`)));
  return answers.filter(Boolean).length;
}

const STORE = "StoreUnavailableError: the store did not answer";
const BUDGET = "CheckBudgetExceededError: the check was not decided within its 150 ms budget";

describe.each([
  ["grpc", async () => grpcEntry()],
  ["http", httpEntry],
] as const)("%s mode: the log line of a Check that could not be decided", (mode, start) => {
  it("an outage's is written once a minute for each kind of error, with the count since; every Check is counted", async () => {
    const entry = await start();
    expect(await askMany(entry, "store", 50, "store")).toBe(50);
    expect(undecidedLines(entry.lines)).toEqual([{ level: 40, mode, since: 0, requestId: undefined, error: STORE }]);

    // Another kind of error has a line of its own.
    expect(await askMany(entry, "budget", 20, "budget")).toBe(20);
    expect(undecidedLines(entry.lines)).toEqual([
      { level: 40, mode, since: 0, requestId: undefined, error: STORE },
      { level: 40, mode, since: 0, requestId: undefined, error: BUDGET },
    ]);

    // Still within the minute of the first line: held back and counted.
    entry.clock.ms = 59_999;
    expect(await askMany(entry, "store", 10, "store-late")).toBe(10);
    expect(undecidedLines(entry.lines)).toHaveLength(2);

    entry.clock.ms = 60_000;
    expect(await entry.ask("store", "store-next-minute")).toBe(true);
    expect(undecidedLines(entry.lines)).toEqual([
      { level: 40, mode, since: 0, requestId: undefined, error: STORE },
      { level: 40, mode, since: 0, requestId: undefined, error: BUDGET },
      { level: 40, mode, since: 59, requestId: undefined, error: STORE },
    ]);
    expect(await counted(entry.metrics)).toEqual({ [`${mode} UNAVAILABLE`]: 81 });
  });

  it("a defect's (INTERNAL) is written for every Check, at level 50 with its request id", async () => {
    const entry = await start();
    for (let i = 0; i < 3; i++) expect(await entry.ask("defect", `defect-${i}`)).toBe(true);
    const defect = "TypeError: Cannot read properties of undefined (reading 'scopes')";
    expect(undecidedLines(entry.lines)).toEqual([0, 1, 2].map((i) => ({ level: 50, mode: undefined, since: undefined, requestId: `defect-${i}`, error: defect })));
    expect(await counted(entry.metrics)).toEqual({ [`${mode} INTERNAL`]: 3 });
  });
});

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");

// The outage itself: MongoDB frozen behind a relay (connections open, nothing moves), Checks of
// made-up keys with valid checksums on both ports, as anyone could send them.
describe.runIf(mongoReady)("Checks of made-up keys while MongoDB is frozen", { timeout: 120_000 }, () => {
  const CHECKS_PER_MODE = 200;
  const OUTAGE_ERRORS = ["StoreUnavailableError: MongoDB did not answer a key lookup within 300 ms", "CheckBudgetExceededError: the check was not decided within its 300 ms budget"];
  let mongo: MongoWire | undefined;
  let relay: TcpRelay | undefined;
  let kg: TestKeygate | undefined;
  beforeAll(async () => {
    mongo = await startMongoWire();
    relay = await startTcpRelay(Number(new URL(mongo.uri).port));
    const uri = new URL(mongo.uri);
    uri.port = String(relay.port);
    kg = await startKeygate({
      policy: TEST_POLICY,
      env: { KEYGATE_MONGODB_URI: uri.toString(), KEYGATE_PEPPER: "logthrottle-pepper-0123456789abcdefghijk", KEYGATE_CHECK_BUDGET_MS: "300" },
    });
  }, 120_000);
  afterAll(async () => {
    relay?.thaw();
    await kg?.stop();
    await relay?.close();
    await mongo?.stop();
  });

  it("are answered UNAVAILABLE and counted each, but logged once for each kind of error and mode; cached keys keep passing", async () => {
    const keygate = kg;
    if (keygate === undefined || relay === undefined) throw new Error("keygate did not start");
    const { ports } = keygate;
    const created = await keygate.admin.createKey({ ownerId: "logthrottle", name: "cached", scopes: ["tutor"] });
    const cached = { "x-api-key": created.secret };
    // Each port's Check of the real key fills the cache it is then answered from.
    expect((await fetch(`http://127.0.0.1:${ports.http}/check/v1/things`, { headers: cached })).status).toBe(200);
    expect(checkOutcome(await keygate.check(checkInit(cached)))).toEqual({ status: 200, code: null });
    const fmt = new KeyFormat("kg");
    relay.freeze();
    const before = keygate.logLines.length;

    const httpStatuses = await Promise.all(
      Array.from({ length: CHECKS_PER_MODE }, async () => {
        const res = await fetch(`http://127.0.0.1:${ports.http}/check/v1/things`, { headers: { "x-api-key": fmt.generate("live") } });
        await res.text();
        return res.status;
      }),
    );
    const grpcCodes = await Promise.all(
      Array.from({ length: CHECKS_PER_MODE }, () =>
        keygate.check(checkInit({ "x-api-key": fmt.generate("live") })).then(
          () => "answered",
          (error: unknown) => (error as ServiceError).code,
        ),
      ),
    );
    expect(new Set(httpStatuses)).toEqual(new Set([503]));
    expect(new Set(grpcCodes)).toEqual(new Set([GrpcStatus.UNAVAILABLE]));
    expect((await fetch(`http://127.0.0.1:${ports.http}/check/v1/things`, { headers: cached })).status).toBe(200);
    expect(checkOutcome(await keygate.check(checkInit(cached)))).toEqual({ status: 200, code: null });

    const lines = undecidedLines(keygate.logLines.slice(before));
    // Each mode logs each kind of error once, not once per Check (400 lines before).
    expect(lines.length).toBeLessThanOrEqual(2 * OUTAGE_ERRORS.length);
    for (const mode of ["http", "grpc"]) {
      const ofMode = lines.filter((line) => line.mode === mode);
      const kinds = ofMode.map((line) => line.error);
      // One line for each kind met, at level 40 with nothing held back yet: the store's lookup
      // deadline and the Check's budget are both 300 ms, so either may run out first.
      expect(kinds.length, mode).toBeGreaterThan(0);
      expect(new Set(kinds).size, mode).toBe(kinds.length);
      for (const kind of kinds) expect(OUTAGE_ERRORS, mode).toContain(kind);
      expect(ofMode.every((line) => line.level === 40 && line.since === 0), mode).toBe(true);
    }
    expect(lines.every((line) => line.mode === "http" || line.mode === "grpc")).toBe(true);
    const metrics = await (await fetch(`http://127.0.0.1:${ports.admin}/metrics`)).text();
    for (const mode of ["http", "grpc"]) expect(metrics, mode).toContain(`keygate_checks_total{decision="error",reason="UNAVAILABLE",mode="${mode}"} ${CHECKS_PER_MODE}`);
  });
});
