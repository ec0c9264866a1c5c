import { connect } from "node:net";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { rawRequest } from "../harness/raw-http.js";

// Envoy's HTTP ext_authz service sends the check with the client's own method. Envoy accepts any
// token as a method; node:http (llhttp) only the methods in http.METHODS, and refuses others
// before keygate sees them. Such a request is refused in keygate's own form, 400 INVALID_REQUEST
// with its JSON body (not Node's bare 400 without a body), whether or not it carries a key; gRPC
// Check judges it like any other method (README, "The canonical path").

let kg: TestKeygate;
let key: string;

function codeOf(body: string): string | null {
  try {
    return (JSON.parse(body) as { error: { code: string } }).error.code;
  } catch {
    return null;
  }
}

const UNREADABLE = {
  status: 400,
  code: "INVALID_REQUEST",
  type: "application/json",
};

describe("a method node:http does not know, in the HTTP mode", () => {
  beforeAll(async () => {
    kg = await startKeygate();
    key = (await kg.admin.createKey({ ownerId: "method_owner", name: "m" })).secret;
  });

  afterAll(async () => {
    await kg?.stop();
  });

  for (const method of ["FOO", "BREW"]) {
    it(`${method} /v1/things with a valid key: keygate's 400 INVALID_REQUEST, and the port serves on`, async () => {
      const answer = await rawRequest(kg.ports.http, method, "/check/v1/things", { "x-api-key": key });
      expect({ status: answer.status, code: codeOf(answer.body), type: answer.headers["content-type"] }).toEqual(UNREADABLE);
      const next = await rawRequest(kg.ports.http, "GET", "/check/v1/things", { "x-api-key": key });
      expect(next.status).toBe(200);
    });

    it(`${method} without a key: keygate's 400 INVALID_REQUEST`, async () => {
      const answer = await rawRequest(kg.ports.http, method, "/check/v1/things", {});
      expect({ status: answer.status, code: codeOf(answer.body), type: answer.headers["content-type"] }).toEqual(UNREADABLE);
    });
  }

  it("a HEAD the parser refuses (raw UTF-8 in its target) is answered 400 without a body, which a HEAD's client never reads", async () => {
    const text = await new Promise<string>((resolve, reject) => {
      const socket = connect(kg.ports.http, "127.0.0.1", () => socket.write(Buffer.from("HEAD /check/v1/caf\u00e9 HTTP/1.1\r\nHost: keygate\r\n\r\n", "utf8")));
      let received = "";
      socket.setEncoding("latin1");
      socket.on("data", (chunk: string) => (received += chunk));
      socket.on("close", () => resolve(received));
      socket.on("error", reject);
    });
    const [head = "", body] = text.split("\r\n\r\n");
    expect(head.split("\r\n")[0]).toBe("HTTP/1.1 400 Bad Request");
    expect(head).toContain("\r\ncontent-length: 0");
    expect(head).toContain("\r\nconnection: close");
    expect(body).toBe("");
  });

  it("such a refusal is counted as a denied Check, as the CONNECT refusal is", async () => {
    const denied = async (): Promise<number> => {
      const text = await (await fetch(`http://127.0.0.1:${kg.ports.admin}/metrics`)).text();
      const line = text.split("\n").find((l) => l.startsWith('keygate_checks_total{decision="deny",reason="INVALID_PATH",mode="http"}'));
      return line === undefined ? 0 : Number(line.split(" ")[1]);
    };
    const before = await denied();
    const answer = await rawRequest(kg.ports.http, "FOO", "/check/v1/things", { "x-api-key": key });
    expect(answer.status).toBe(400);
    expect(await denied()).toBe(before + 1);
  });

  it("gRPC Check judges such a method like any other (a valid key on a \"*\" route passes)", async () => {
    expect(checkOutcome(await kg.check(checkInit({ "x-api-key": key }, "/v1/things", "BREW")))).toEqual({ status: 200, code: null });
  });
});
