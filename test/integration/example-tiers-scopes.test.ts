import { resolve } from "node:path";
import { readFileSync } from "node:fs";
import { parse } from "yaml";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { checkInit, checkOutcome, httpCheck, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// deploy/config/daily-message-tiers.yaml listed the scopes curriculum, exercises and pronunciation
// in its catalog (the product it models gates AI exercise generation and pronunciation scoring by
// them), but no route required them: the catch-all `/` route requires nothing, so a key issued
// with the default scope ["tutor"] reached every one of those endpoints. Usage and conversations
// belong to tutor.
const policy = parse(readFileSync(resolve(import.meta.dirname, "../../deploy/config/daily-message-tiers.yaml"), "utf8")) as unknown;

let kg: TestKeygate;
beforeAll(async () => {
  kg = await startKeygate({ policy });
});
afterAll(async () => {
  await kg.stop();
});

describe("daily-message-tiers.yaml: every scope in the catalog guards its endpoints", () => {
  it.each(["curriculum", "exercises", "pronunciation"])("a tutor-only key (the default scope) is refused 403 naming %s on its endpoints", async (scope) => {
    await kg.admin.upsertAccount({ ownerId: `tiers-${scope}`, plan: "free" });
    const { secret, key } = await kg.admin.createKey({ ownerId: `tiers-${scope}`, name: "app" });
    expect(key?.scopes).toEqual(["tutor"]);
    const http = await httpCheck(kg.ports.http, `/check/api/v1/${scope}`, { authorization: `Bearer ${secret}` });
    const grpc = checkOutcome(await kg.check(checkInit({ authorization: `Bearer ${secret}` }, `/api/v1/${scope}`, "POST")));
    expect({ http: http.status, grpc: grpc.status }).toEqual({ http: 403, grpc: 403 });
    expect(JSON.parse(http.body).error.message).toBe(`This API key does not have the "${scope}" scope.`);
  });

  it.each(["usage", "conversations"])("a decks-only key is refused 403 naming tutor on /api/v1/%s, and a tutor key passes", async (path) => {
    await kg.admin.upsertAccount({ ownerId: `tiers-${path}`, plan: "free" });
    const decks = await kg.admin.createKey({ ownerId: `tiers-${path}`, name: "decks", scopes: ["decks"] });
    const tutor = await kg.admin.createKey({ ownerId: `tiers-${path}`, name: "tutor" });
    const refused = await httpCheck(kg.ports.http, `/check/api/v1/${path}`, { authorization: `Bearer ${decks.secret}` });
    expect([refused.status, JSON.parse(refused.body).error.message]).toEqual([403, 'This API key does not have the "tutor" scope.']);
    expect((await httpCheck(kg.ports.http, `/check/api/v1/${path}`, { authorization: `Bearer ${tutor.secret}` })).status).toBe(200);
  });
});
