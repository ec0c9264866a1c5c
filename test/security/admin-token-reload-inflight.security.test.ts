import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { request } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { stringify } from "yaml";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AUTH_FAILURE_LIMIT } from "../../src/admin/auth.js";
import { ADMIN_TOKEN, TEST_POLICY, postJson, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// The admin server admits a KeyAdmin call when its headers arrive, and its body may follow for
// up to the request timeout. A tokens-file reload in between must hold for that call too: a token
// removed by the reload is refused as an unknown token, one narrowed to fewer owners as for any
// other owner, and nothing is written. Each call here is held with "Expect: 100-continue": its
// body is sent only after keygate has admitted the token and the reload has been applied.

const LEAKED = { name: "leaked", token: "reload-inflight-leaked-token-0123456789ab", permissions: ["keys:write", "keys:read"], owners: ["acme", "globex", "initech", "umbrella"] };
const NARROWED = { ...LEAKED, owners: ["acme"] };
const BYSTANDER = { name: "bystander", token: "reload-inflight-bystander-token-0123456789", permissions: ["keys:read"] };

interface Answer {
  status: number;
  json: Record<string, unknown>;
}

interface HeldCall {
  /** Settles once keygate has answered "100 Continue": the token was admitted. */
  admitted: Promise<void>;
  answer: Promise<Answer>;
  /** Sends the body. */
  send(): void;
}

/** A Connect JSON POST whose body waits until `send` is called. */
function heldCall(port: number, method: string, body: unknown, token: string): HeldCall {
  const payload = JSON.stringify(body);
  const req = request({
    host: "127.0.0.1",
    port,
    method: "POST",
    path: `/keygate.v1.KeyAdmin/${method}`,
    agent: false,
    headers: { "content-type": "application/json", "content-length": String(Buffer.byteLength(payload)), authorization: `Bearer ${token}`, expect: "100-continue" },
  });
  const answer = new Promise<Answer>((resolve, reject) => {
    req.on("error", reject);
    req.on("response", (res) => {
      const chunks: Buffer[] = [];
      res.on("data", (chunk: Buffer) => chunks.push(chunk));
      res.on("error", reject);
      res.on("end", () => resolve({ status: res.statusCode ?? 0, json: JSON.parse(Buffer.concat(chunks).toString("utf8") || "{}") as Record<string, unknown> }));
    });
  });
  const admitted = new Promise<void>((resolve, reject) => {
    req.once("continue", () => resolve());
    answer.then(
      (early) => reject(new Error(`answered ${early.status} ${JSON.stringify(early.json)} before admitting the body`)),
      (error: unknown) => reject(error instanceof Error ? error : new Error(String(error))),
    );
  });
  req.flushHeaders();
  return { admitted, answer, send: () => req.end(payload) };
}

describe("admin tokens reloaded while a call's body is arriving", { timeout: 60_000 }, () => {
  let kg: TestKeygate;
  let dir: string;
  let file: string;

  /** Writes the tokens file and reloads it: "applied", or "unchanged" when the file already held `tokens`. */
  function reloadTokens(tokens: readonly object[]): string {
    writeFileSync(file, stringify({ tokens }));
    return kg.app.reload().adminTokens;
  }

  async function keyNames(ownerId: string): Promise<string[]> {
    return (await kg.admin.listKeys({ ownerId, includeRevoked: true })).keys.map((k) => k.name);
  }

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "keygate-reload-inflight-"));
    file = join(dir, "admin-tokens.yaml");
    writeFileSync(file, stringify({ tokens: [LEAKED] }));
    kg = await startKeygate({ policy: TEST_POLICY, env: { KEYGATE_ADMIN_TOKENS_FILE: file } });
  });
  afterAll(async () => {
    await kg?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  describe("security", () => {
    it("a token narrowed to other owners cannot finish a call for the owner it lost: 403 permission_denied, no key created", async () => {
      reloadTokens([LEAKED]);
      const held = heldCall(kg.ports.admin, "CreateKey", { ownerId: "globex", name: "after-narrowing" }, LEAKED.token);
      await held.admitted;
      expect(reloadTokens([NARROWED])).toBe("applied");
      held.send();
      expect(await held.answer).toEqual({ status: 403, json: { code: "permission_denied", message: 'the admin token "leaked" may not act for this owner_id' } });
      expect(await keyNames("globex")).toEqual([]);
    });

    it("a removed token cannot finish a call it started: 401 unauthenticated as an unknown token, no key created, logged by token id", async () => {
      reloadTokens([LEAKED]);
      const held = heldCall(kg.ports.admin, "CreateKey", { ownerId: "acme", name: "after-removal" }, LEAKED.token);
      await held.admitted;
      expect(reloadTokens([])).toBe("applied");
      held.send();
      const answer = await held.answer;
      const fresh = await postJson(kg.ports.admin, "CreateKey", { ownerId: "acme", name: "fresh" }, LEAKED.token);
      expect(answer).toEqual({ status: 401, json: { code: "unauthenticated", message: "the admin token is not valid" } });
      expect(answer).toEqual(fresh);
      expect(await keyNames("acme")).toEqual([]);
      const line = kg.logLines.find((l) => l.includes("admin call refused: a reload removed its token")) ?? "";
      expect(line).toContain('"tokenId":"leaked"');
      expect(line).not.toContain(LEAKED.token);
    });

    it("refusals of calls in flight are not counted as failed logins: the address is not blocked", async () => {
      reloadTokens([LEAKED]);
      const held = Array.from({ length: AUTH_FAILURE_LIMIT.limit + 1 }, (_, i) => heldCall(kg.ports.admin, "CreateKey", { ownerId: "umbrella", name: `burst-${i}` }, LEAKED.token));
      await Promise.all(held.map((call) => call.admitted));
      expect(reloadTokens([])).toBe("applied");
      for (const call of held) call.send();
      const answers = await Promise.all(held.map((call) => call.answer));
      expect(answers.map((a) => [a.status, a.json["code"]])).toEqual(held.map(() => [401, "unauthenticated"]));
      // More refusals than the failed-login burst, yet a good token from the same address still gets in.
      expect((await postJson(kg.ports.admin, "ListKeys", { ownerId: "umbrella" }, ADMIN_TOKEN)).status).toBe(200);
      expect(await keyNames("umbrella")).toEqual([]);
    });
  });

  describe("happy", () => {
    it("a call whose token the reload left as it was finishes under it", async () => {
      reloadTokens([LEAKED]);
      const held = heldCall(kg.ports.admin, "CreateKey", { ownerId: "initech", name: "unchanged-token" }, LEAKED.token);
      await held.admitted;
      expect(reloadTokens([LEAKED, BYSTANDER])).toBe("applied");
      held.send();
      expect((await held.answer).status).toBe(200);
      expect(await keyNames("initech")).toEqual(["unchanged-token"]);
    });
  });
});
