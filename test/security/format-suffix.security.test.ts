import { resolve } from "node:path";
import { readFileSync } from "node:fs";
import { parse } from "yaml";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { checkInit, checkOutcome, httpCheck, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// deploy/config/daily-message-tiers.yaml: chat is the one metered route and every other catalog
// scope guards its endpoints, with a catch-all `/` that is free and needs no scope. Routes match
// on a segment boundary, so `/api/v1/chat.json` was not `/api/v1/chat` to keygate: it fell to the
// catch-all. Rails serves every route with an optional `(.:format)` suffix (and Grape, Django REST
// framework's format_suffix_patterns and Spring MVC before 5.3 the same), so to the API it is the
// chat endpoint: a free key past its 5 messages kept chatting, uncounted, and a tutor-only key
// read /api/v1/curriculum.json. Such a path is now refused 400 INVALID_REQUEST, as other paths
// servers read differently are.
const policy = parse(readFileSync(resolve(import.meta.dirname, "../../deploy/config/daily-message-tiers.yaml"), "utf8")) as unknown;

let kg: TestKeygate;
beforeAll(async () => {
  kg = await startKeygate({ policy, httpAuthzProxy: "nginx" });
});
afterAll(async () => {
  await kg?.stop();
});

const check = async (secret: string, method: string, path: string): Promise<number> =>
  (await httpCheck(kg.ports.http, "/check", { "x-original-uri": path, "x-original-method": method, authorization: `Bearer ${secret}` })).status;

describe("daily-message-tiers.yaml: a format suffix never reaches an endpoint its bare path guards", () => {
  it("a free key past its daily 5 chat messages is not let through by /api/v1/chat.json", async () => {
    await kg.admin.upsertAccount({ ownerId: "tiers-suffix-chat", plan: "free" });
    const { secret } = await kg.admin.createKey({ ownerId: "tiers-suffix-chat", name: "app" });
    const chat: number[] = [];
    for (let i = 0; i < 6; i++) chat.push(await check(secret, "POST", "/api/v1/chat/messages"));
    expect(chat).toEqual([200, 200, 200, 200, 200, 402]);
    const suffixed: number[] = [];
    for (let i = 0; i < 3; i++) suffixed.push(await check(secret, "POST", "/api/v1/chat.json"));
    const grpc = checkOutcome(await kg.check(checkInit({ authorization: `Bearer ${secret}` }, "/api/v1/chat.json", "POST"))).status;
    expect([...suffixed, grpc]).toEqual([400, 400, 400, 400]);
    const body = (await httpCheck(kg.ports.http, "/check", { "x-original-uri": "/api/v1/chat.json", "x-original-method": "POST", authorization: `Bearer ${secret}` })).body;
    expect(JSON.parse(body).error).toMatchObject({ code: "INVALID_REQUEST", message: expect.stringContaining('format suffix (such as ".json")') });
  });

  it("a tutor-only key is not let through to /api/v1/curriculum.json", async () => {
    await kg.admin.upsertAccount({ ownerId: "tiers-suffix-scope", plan: "free" });
    const { secret } = await kg.admin.createKey({ ownerId: "tiers-suffix-scope", name: "app" });
    expect(await check(secret, "GET", "/api/v1/curriculum")).toBe(403);
    const statuses = [await check(secret, "GET", "/api/v1/curriculum.json"), await check(secret, "GET", "/api/v1/pronunciation.xml")];
    expect(statuses).toEqual([400, 400]);
  });

  it("a path that is the curriculum endpoint only with both its letter case ignored and its suffix cut is refused too", async () => {
    // Spring MVC before 5.3 with a case-insensitive matcher serves /api/v1/Curriculum.json as
    // /api/v1/curriculum; each reading alone was refused, both together were judged as the catch-all.
    await kg.admin.upsertAccount({ ownerId: "tiers-suffix-case", plan: "free" });
    const { secret } = await kg.admin.createKey({ ownerId: "tiers-suffix-case", name: "app" });
    const statuses = [];
    for (const path of ["/api/v1/curriculum", "/api/v1/Curriculum", "/api/v1/curriculum.json", "/api/v1/Curriculum.json", "/api/v1/CURRICULUM.JSON/"]) statuses.push(await check(secret, "GET", path));
    expect(statuses).toEqual([403, 400, 400, 400, 400]);
  });
});
