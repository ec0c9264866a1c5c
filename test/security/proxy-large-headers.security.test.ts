import { connect } from "node:net";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startKeygate } from "../harness/keygate.js";
import { MAX_HEADER_BYTES } from "../../src/server/http-authz.js";
import { shippedProxies } from "../harness/proxies.js";
import { OPEN_POLICY, startProxiedKeygate } from "../harness/proxied-keygate.js";
import type { ProxiedKeygate } from "../harness/proxied-keygate.js";

// nginx takes request headers up to 4 x 8 KiB and Caddy up to 1 MiB, and both pass every client
// header on to keygate's check: keygate's HTTP port reads heads up to 64 KiB (MAX_HEADER_BYTES),
// so a request with a large cookie jar that the API would take is judged, not refused 431.


function sendRaw(port: number, lines: string[]): Promise<number> {
  return new Promise((resolve, reject) => {
    const socket = connect(port, "127.0.0.1", () => socket.write(`${lines.join("\r\n")}\r\n\r\n`));
    let text = "";
    socket.setEncoding("latin1");
    socket.on("data", (chunk: string) => (text += chunk));
    socket.on("close", () => resolve(Number(/^HTTP\/1\.[01] (\d{3}) /.exec(text)?.[1] ?? 0)));
    socket.on("error", reject);
  });
}

describe.each(shippedProxies())("large request heads behind $name (the shipped config)", (shipped) => {
  const { available } = shipped;
  let running: ProxiedKeygate;
  beforeAll(async () => {
    if (available) running = await startProxiedKeygate(shipped, `lh-${shipped.name}`);
  });
  afterAll(async () => {
    await running?.stop();
  });

  it.runIf(available)("a valid key's request with three 7 KB cookie/header lines (within nginx's and Caddy's limits) is served", async () => {
    const big = "a".repeat(7000);
    const before = running.upstream.requests.length;
    const status = await sendRaw(running.proxy.port, ["GET /v1/things HTTP/1.1", "Host: 127.0.0.1", "Connection: close", `X-Api-Key: ${running.key}`, `Cookie: c1=${big}`, `Cookie: c2=${big}`, `X-Trace-Context: ${big}`]);
    expect(status).toBe(200);
    expect(running.upstream.requests.length).toBe(before + 1);
  });
});

describe("keygate's HTTP port and a request head past its bound", () => {
  it(`answers 431 to a head over ${MAX_HEADER_BYTES} bytes, and goes on deciding`, async () => {
    const kg = await startKeygate({ policy: OPEN_POLICY });
    try {
      const big = "a".repeat(8000);
      const lines = ["GET /check/v1/things HTTP/1.1", "Host: 127.0.0.1", "Connection: close"];
      for (let i = 0; lines.join("\r\n").length <= MAX_HEADER_BYTES; i++) lines.push(`X-Filler-${i}: ${big}`);
      expect(await sendRaw(kg.ports.http, lines)).toBe(431);
      expect(await sendRaw(kg.ports.http, ["GET /check/v1/things HTTP/1.1", "Host: 127.0.0.1", "Connection: close"])).toBe(401);
    } finally {
      await kg.stop();
    }
  });
});
