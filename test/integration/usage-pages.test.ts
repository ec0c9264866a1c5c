import { Code, ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DEFAULT_POLICY_INPUT } from "../../src/config.js";
import type { GetUsageRequest, GetUsageResponse, KeyDayUsage } from "../../src/gen/keygate/v1/key_admin_pb.js";
import type { UsageDelta } from "../../src/store/store.js";
import { TestClock } from "../harness/clock.js";
import { checkInit, checkOutcome, postJson, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";

// GetUsage pages its by_key rows (one per key and day, by day then key id) with page_size and
// page_token, and every page carries the totals of the whole range. Before, it answered every
// row of up to 366 days at once: ~110 keys used daily for a year passed a gRPC client's default
// 4 MB, and a larger account made keygate build the whole answer in memory. The stores read one
// page of key-days and add the totals up themselves. A client from before paging sends no
// page_size and reads no next_page_token: it gets the whole range up to 10,000 rows and is
// refused past that (FAILED_PRECONDITION naming page_size), never a list cut short, which an
// invoice built from it would silently miss.

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");
const PEPPER = "usage-pages-pepper-0123456789abcdefghijklm";
const TODAY = "2026-03-10";
const POLICY = {
  ...DEFAULT_POLICY_INPUT,
  defaultPlan: "metered",
  plans: { metered: { maxActiveKeys: 5, rateLimit: { limit: 1000, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: 1000 } },
  scopes: { catalog: ["read"], default: ["read"] },
  routes: [{ method: "*", pathPrefix: "/v1", cost: 1 }],
};
/** A key id that no key has (a deleted key's rows): its rows have no name. Sorts after every key made now. */
const GONE = "key_7ZZZZZZZZZZZZZZZZZZZZZZZZZ";
const BAD_TOKEN = "page_token: is not a token from a previous response";
const CAP_REFUSAL =
  "by_key would hold more than 10000 rows (one per key and day from 2025-01-01 to 2025-12-31), more than an answer without page_size carries: " +
  "send page_size (1-1000) and follow next_page_token, or ask for fewer days";

/** A row as [day, key id, key name, allowed, denied, credits]. */
function row(u: KeyDayUsage): unknown[] {
  return [u.day, u.keyId, u.keyName, u.usage?.allowed, u.usage?.denied, u.usage?.creditsUsed];
}

/** The code and message a call was refused with. */
async function refusal(call: Promise<unknown>): Promise<unknown> {
  return call.then(
    () => "answered",
    (error: unknown) => (error instanceof ConnectError ? [Code[error.code], error.rawMessage] : error),
  );
}

/** `count` key-days of 2025, by day then key id, each one allowed request: rows of no real key. */
function keyDays(ownerId: string, count: number): UsageDelta[] {
  const rows: UsageDelta[] = [];
  for (let day = 0; rows.length < count; day++) {
    const date = new Date(Date.UTC(2025, 0, 1) + day * 86_400_000).toISOString().slice(0, 10);
    for (let k = 0; k < 28 && rows.length < count; k++) rows.push({ ownerId, keyId: `key_0000000000000000000000${String(k).padStart(4, "0")}`, day: date, outcome: "ALLOWED", count: 1, credits: 0 });
  }
  return rows;
}

for (const backend of [{ name: "SQLite", mongo: false, ready: true }, { name: "MongoDB", mongo: true, ready: mongoReady }]) {
  describe.runIf(backend.ready)(`GetUsage pages (${backend.name})`, { timeout: 120_000 }, () => {
    let mongo: MongoWire | undefined;
    let kg: TestKeygate;
    const ownerId = "pages-owner";
    const key: Record<"a" | "b" | "c", { id: string; secret: string }> = { a: { id: "", secret: "" }, b: { id: "", secret: "" }, c: { id: "", secret: "" } };
    /** Every row of the fixture, by day then key id (set in beforeAll). */
    let expected: unknown[][] = [];

    /** Every page of `request` at `pageSize`, in order. */
    async function pages(request: Partial<GetUsageRequest>, pageSize: number): Promise<GetUsageResponse[]> {
      const answers: GetUsageResponse[] = [];
      let pageToken = "";
      do {
        const page = await kg.admin.getUsage({ ownerId, from: "2026-03-01", to: "2026-03-03", ...request, pageSize, pageToken });
        answers.push(page);
        pageToken = page.nextPageToken;
      } while (pageToken !== "" && answers.length < 50);
      return answers;
    }

    beforeAll(async () => {
      if (backend.mongo) mongo = await startMongoWire();
      const clock = new TestClock();
      clock.freeze(`${TODAY}T12:00:00.000Z`);
      kg = await startKeygate({ policy: POLICY, clock, env: mongo === undefined ? {} : { KEYGATE_MONGODB_URI: mongo.uri, KEYGATE_PEPPER: PEPPER } });
      await kg.admin.upsertAccount({ ownerId, plan: "metered" });
      // Made in this order, so their ids (ULIDs) sort a < b < c.
      for (const name of ["a", "b", "c"] as const) {
        const created = await kg.admin.createKey({ ownerId, name: `key-${name}` });
        key[name] = { id: created.key?.id ?? "", secret: created.secret };
      }
      const at = (day: string, keyId: string, outcome: string, count: number, credits = 0): UsageDelta => ({ ownerId, keyId, day, outcome, count, credits });
      await kg.app.store.applyUsage(
        [
          at("2026-03-01", "", "ALLOWED", 1, 5), // ChargeUsage of the account alone
          at("2026-03-01", key.a.id, "ALLOWED", 3, 3),
          at("2026-03-01", key.a.id, "RATE_LIMITED", 2),
          at("2026-03-01", key.c.id, "ALLOWED", 1, 1),
          at("2026-03-02", key.b.id, "ALLOWED", 4, 4),
          at("2026-03-02", key.b.id, "QUOTA_EXCEEDED", 1),
          at("2026-03-02", GONE, "ALLOWED", 2, 2),
          at("2026-03-03", key.a.id, "ALLOWED", 1, 1),
          at("2026-03-03", key.b.id, "ALLOWED", 1, 1),
          at("2026-03-03", key.c.id, "ALLOWED", 1, 1),
          // Outside the range, and another owner's: in no page and no total.
          at("2026-02-28", key.a.id, "ALLOWED", 100, 100),
          at("2026-03-11", key.a.id, "ALLOWED", 100, 100),
          { ...at("2026-03-02", key.a.id, "ALLOWED", 100, 100), ownerId: "pages-other-owner" },
        ],
        [],
      );
      expected = [
        ["2026-03-01", "", "", 1n, {}, 5n],
        ["2026-03-01", key.a.id, "key-a", 3n, { RATE_LIMITED: 2n }, 3n],
        ["2026-03-01", key.c.id, "key-c", 1n, {}, 1n],
        ["2026-03-02", key.b.id, "key-b", 4n, { QUOTA_EXCEEDED: 1n }, 4n],
        ["2026-03-02", GONE, "", 2n, {}, 2n],
        ["2026-03-03", key.a.id, "key-a", 1n, {}, 1n],
        ["2026-03-03", key.b.id, "key-b", 1n, {}, 1n],
        ["2026-03-03", key.c.id, "key-c", 1n, {}, 1n],
      ];
    }, 120_000);
    afterAll(async () => {
      await kg?.stop();
      await mongo?.stop();
    });

    describe("happy", () => {
      it("without page_size answers the whole range by day then key id, with no next_page_token", async () => {
        const whole = await kg.admin.getUsage({ ownerId, from: "2026-03-01", to: "2026-03-03" });
        expect(whole.byKey.map(row)).toEqual(expected);
        expect(whole.totals).toMatchObject({ allowed: 14n, denied: { RATE_LIMITED: 2n, QUOTA_EXCEEDED: 1n }, creditsUsed: 18n });
        expect(whole.nextPageToken).toBe("");
      });

      it("pages of 3 hold exactly the next 3 rows, together the whole answer, each with the whole range's totals", async () => {
        const whole = await kg.admin.getUsage({ ownerId, from: "2026-03-01", to: "2026-03-03" });
        const answers = await pages({}, 3);
        expect(answers.map((page) => page.byKey.map(row))).toEqual([expected.slice(0, 3), expected.slice(3, 6), expected.slice(6)]);
        expect(answers.map((page) => page.nextPageToken !== "")).toEqual([true, true, false]);
        for (const page of answers) expect(page.totals).toEqual(whole.totals);
        expect(answers.flatMap((page) => page.byKey)).toEqual(whole.byKey);
      });

      it("a page that ends on the last row is the last page; page_size may change between pages", async () => {
        expect((await pages({}, 8)).map((page) => [page.byKey.length, page.nextPageToken])).toEqual([[8, ""]]);
        expect((await pages({}, 7)).map((page) => page.byKey.length)).toEqual([7, 1]);
        const first = await kg.admin.getUsage({ ownerId, from: "2026-03-01", to: "2026-03-03", pageSize: 1 });
        const rest = await kg.admin.getUsage({ ownerId, from: "2026-03-01", to: "2026-03-03", pageSize: 1000, pageToken: first.nextPageToken });
        expect([...first.byKey, ...rest.byKey].map(row)).toEqual(expected);
        expect(rest.nextPageToken).toBe("");
        // page_size 0 with a token pages on (by 1000), as ListKeys' 0 means its default.
        const defaulted = await kg.admin.getUsage({ ownerId, from: "2026-03-01", to: "2026-03-03", pageToken: first.nextPageToken });
        expect(defaulted.byKey.map(row)).toEqual(expected.slice(1));
      });

      it("the store reads one page of key-days, with the totals of the whole range by outcome", async () => {
        const first = await kg.app.store.listUsagePage({ ownerId, fromDay: "2026-03-01", toDay: "2026-03-03", after: null, keyDays: 2 });
        expect(first.rows).toEqual([
          { keyId: "", day: "2026-03-01", outcome: "ALLOWED", count: 1, credits: 5 },
          { keyId: key.a.id, day: "2026-03-01", outcome: "ALLOWED", count: 3, credits: 3 },
          { keyId: key.a.id, day: "2026-03-01", outcome: "RATE_LIMITED", count: 2, credits: 0 },
        ]);
        expect(first.totals).toEqual([
          { outcome: "ALLOWED", count: 14, credits: 18 },
          { outcome: "QUOTA_EXCEEDED", count: 1, credits: 0 },
          { outcome: "RATE_LIMITED", count: 2, credits: 0 },
        ]);
        const next = await kg.app.store.listUsagePage({ ownerId, fromDay: "2026-03-01", toDay: "2026-03-03", after: { day: "2026-03-01", keyId: key.c.id }, keyDays: 2 });
        expect(next.rows).toEqual([
          { keyId: key.b.id, day: "2026-03-02", outcome: "ALLOWED", count: 4, credits: 4 },
          { keyId: key.b.id, day: "2026-03-02", outcome: "QUOTA_EXCEEDED", count: 1, credits: 0 },
          { keyId: GONE, day: "2026-03-02", outcome: "ALLOWED", count: 2, credits: 2 },
        ]);
        expect(next.totals).toEqual(first.totals);
      });

      it("rows this replica has not written yet (the store refusing the flush) fall in their page, counted once", async () => {
        const store = kg.app.store;
        const realApply = store.applyUsage.bind(store);
        store.applyUsage = async () => {
          throw new Error("injected: SQLITE_FULL: database or disk is full");
        };
        const range = { from: "2026-03-01", to: TODAY };
        const read = async (): Promise<{ whole: GetUsageResponse; paged: GetUsageResponse[] }> => ({ whole: await kg.admin.getUsage({ ownerId, ...range }), paged: await pages(range, 3) });
        try {
          // Today's rows of b and a, only in the recorder: a key-day past the store's last one.
          for (const secret of [key.b.secret, key.b.secret, key.a.secret]) expect(checkOutcome(await kg.check(checkInit({ "x-api-key": secret }, "/v1/x"))).code).toBe(null);
          const unwritten = [
            [TODAY, key.a.id, "key-a", 1n, {}, 1n],
            [TODAY, key.b.id, "key-b", 2n, {}, 2n],
          ];
          const { whole, paged } = await read();
          expect(whole.byKey.map(row)).toEqual([...expected, ...unwritten]);
          expect(whole.totals).toMatchObject({ allowed: 17n, creditsUsed: 21n });
          expect(paged.map((page) => page.byKey.length)).toEqual([3, 3, 3, 1]);
          expect(paged.flatMap((page) => page.byKey)).toEqual(whole.byKey);
          for (const page of paged) expect(page.totals).toEqual(whole.totals);
        } finally {
          store.applyUsage = realApply;
        }
        // Written now: the same answer, from the store alone.
        const after = await read();
        expect(after.whole.totals).toMatchObject({ allowed: 17n, creditsUsed: 21n });
        expect(after.paged.flatMap((page) => page.byKey)).toEqual(after.whole.byKey);
        expect(after.whole.byKey).toHaveLength(10);
      });
    });

    describe("error", () => {
      it("page_size outside 0-1000 is INVALID_ARGUMENT naming page_size", async () => {
        for (const pageSize of [1001, -1]) {
          expect(await refusal(kg.admin.getUsage({ ownerId, from: "2026-03-01", to: "2026-03-03", pageSize }))).toEqual(["InvalidArgument", "page_size: must be between 0 and 1000"]);
        }
      });

      it("without page_size, 10,000 rows are answered whole and 10,001 refused naming page_size, never cut short", async () => {
        await kg.app.store.applyUsage([...keyDays("cap-full", 10_000), ...keyDays("cap-over", 10_001)], []);
        const range = { from: "2025-01-01", to: "2025-12-31" };
        // As a client from before paging sends it: no page_size, no page_token (Connect JSON, as curl).
        const full = await postJson(kg.ports.admin, "GetUsage", { ownerId: "cap-full", ...range });
        expect(full.status).toBe(200);
        expect(Array.isArray(full.json["byKey"]) ? full.json["byKey"].length : full.json).toBe(10_000);
        expect(full.json["totals"]).toEqual({ allowed: "10000" });
        expect("nextPageToken" in full.json).toBe(false);
        const over = await postJson(kg.ports.admin, "GetUsage", { ownerId: "cap-over", ...range });
        expect([over.status, over.json["code"], over.json["message"]]).toEqual([400, "failed_precondition", CAP_REFUSAL]);
        expect(await refusal(kg.admin.getUsage({ ownerId: "cap-over", ...range }))).toEqual(["FailedPrecondition", CAP_REFUSAL]);
        // Paged, the same range is all there: 11 pages, the last of one row.
        const answers: GetUsageResponse[] = [];
        let pageToken = "";
        do {
          const page = await kg.admin.getUsage({ ownerId: "cap-over", ...range, pageSize: 1000, pageToken });
          answers.push(page);
          pageToken = page.nextPageToken;
        } while (pageToken !== "" && answers.length < 20);
        expect(answers.map((page) => page.byKey.length)).toEqual([...Array<number>(10).fill(1000), 1]);
        expect(answers.flatMap((page) => page.byKey.map((u) => `${u.day}|${u.keyId}`))).toEqual(keyDays("cap-over", 10_001).map((u) => `${u.day}|${u.keyId}`));
        for (const page of answers) expect(page.totals).toMatchObject({ allowed: 10_001n, denied: {}, creditsUsed: 0n });
      });
    });

    describe("security", () => {
      const range = { from: "2026-03-01", to: "2026-03-03" };
      const text = (token: string): string => Buffer.from(token, "base64url").toString("utf8");
      const token = (content: string): string => Buffer.from(content, "utf8").toString("base64url");

      it("a token that is not one of this range's, or edited, is INVALID_ARGUMENT naming page_token", async () => {
        const first = await kg.admin.getUsage({ ownerId, ...range, pageSize: 2 });
        const good = first.nextPageToken;
        expect(text(good)).toMatch(new RegExp(`^after:2026-03-01\\|${key.a.id}\\|[A-Za-z0-9_-]{16}$`));
        const listKeysToken = (await kg.admin.listKeys({ ownerId, pageSize: 1 })).nextPageToken;
        const tampered = [
          "not-a-token",
          listKeysToken,
          good.slice(0, -2),
          token(text(good).replace("2026-03-01", "2026-03-02")),
          token(text(good).replace(key.a.id, key.b.id)),
          token(text(good).replace(/\|[^|]*$/, "|AAAAAAAAAAAAAAAA")),
        ];
        for (const pageToken of tampered) {
          expect(await refusal(kg.admin.getUsage({ ownerId, ...range, pageSize: 2, pageToken })), pageToken).toEqual(["InvalidArgument", BAD_TOKEN]);
        }
        // Another owner's or another range's: its position would skip this range's first rows.
        expect(await refusal(kg.admin.getUsage({ ownerId: "pages-other-owner", ...range, pageSize: 2, pageToken: good }))).toEqual(["InvalidArgument", BAD_TOKEN]);
        expect(await refusal(kg.admin.getUsage({ ownerId, from: "2026-03-01", to: "2026-03-04", pageSize: 2, pageToken: good }))).toEqual(["InvalidArgument", BAD_TOKEN]);
        expect(await refusal(kg.admin.getUsage({ ownerId, from: "2026-02-28", to: "2026-03-03", pageSize: 2, pageToken: good }))).toEqual(["InvalidArgument", BAD_TOKEN]);
        // The token itself still works for its own range.
        expect((await kg.admin.getUsage({ ownerId, ...range, pageSize: 2, pageToken: good })).byKey.map(row)).toEqual(expected.slice(2, 4));
      });
    });
  });
}
