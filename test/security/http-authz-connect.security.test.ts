import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { CONNECT_REFUSAL } from "../../src/authz/routes.js";
import { startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { sendRaw } from "../harness/raw-http.js";

// Envoy's HTTP ext_authz service (KEYGATE_HTTP_AUTHZ_PROXY=envoy, the default) sends the check
// with the client's own method. For a CONNECT (Envoy with `upgrade_configs: CONNECT`) its HTTP/1
// codec writes "CONNECT <authority> HTTP/1.1"; a client-side proxy may write "CONNECT /check/...".
// node:http hands either to the server's 'connect' event, not to the request handler: with nothing
// listening the connection closed with no answer, to Envoy an ext_authz error, which
// `failure_mode_allow: true` turns into an allow of the tunnel. A CONNECT is refused as the
// decision refuses it anywhere: 400 INVALID_REQUEST, counted, and the port keeps serving.

describe("a CONNECT check on the HTTP authorization port (Envoy's HTTP service)", () => {
  let kg: TestKeygate;
  let secret = "";

  beforeAll(async () => {
    kg = await startKeygate();
    secret = (await kg.admin.createKey({ ownerId: "connect-owner", name: "c", scopes: [] })).secret;
  });
  afterAll(async () => {
    await kg?.stop();
  });

  it.each([
    ["authority-form, as Envoy's codec writes a CONNECT", "CONNECT api.example.com:443 HTTP/1.1", "api.example.com:443"],
    ["origin-form below /check", "CONNECT /check/v1/things HTTP/1.1", "api.example.com"],
  ])("%s: answered 400 INVALID_REQUEST (a denial), not a dropped connection", async (_name, line, host) => {
    const res = await sendRaw(kg.ports.http, line, [
      ["Host", host],
      ["X-Api-Key", secret],
      ["Content-Length", "0"],
      ["Connection", "close"],
    ]);
    expect(res.status, `raw answer: ${JSON.stringify(res.text.slice(0, 200))}`).toBe(400);
    const [head = "", body = ""] = res.text.split("\r\n\r\n");
    expect(head.split("\r\n")[0]).toBe("HTTP/1.1 400 Bad Request");
    expect(head.toLowerCase()).toContain("\r\ncontent-type: application/json");
    expect(head.toLowerCase()).toContain("\r\nconnection: close");
    expect(head.toLowerCase()).toContain(`\r\ncontent-length: ${Buffer.byteLength(body)}`);
    const error = (JSON.parse(body) as { error: { code: string; message: string } }).error;
    expect(error.code).toBe("INVALID_REQUEST");
    expect(error.message).toBe(CONNECT_REFUSAL.message);
  });

  it("counts each refused CONNECT, and the port goes on serving checks", async () => {
    const metrics = await (await fetch(`http://127.0.0.1:${kg.ports.admin}/metrics`)).text();
    const refused = Number(/^keygate_checks_total\{decision="deny",reason="INVALID_PATH",mode="http"\} (\d+)$/m.exec(metrics)?.[1] ?? "0");
    expect(refused).toBe(2);
    const res = await fetch(`http://127.0.0.1:${kg.ports.http}/check/v1/things`, { headers: { "x-api-key": secret } });
    expect(res.status).toBe(200);
  });
});
