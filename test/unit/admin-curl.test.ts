import { execFileSync } from "node:child_process";
import { describe, expect, it } from "vitest";
import { adminCurlLines, reachableHost, shellQuote } from "../../src/cli/admin-curl.js";

// The first start's curl line is pasted into a shell as printed: its host must reach the
// address keygate is bound to, and the token file's path must stay one word.

describe("the first start's curl line.happy", () => {
  it("names the bound address: loopback for a wildcard, IPv6 in brackets", () => {
    expect(reachableHost("0.0.0.0")).toBe("127.0.0.1");
    expect(reachableHost("::")).toBe("[::1]");
    expect(reachableHost("0:0:0:0:0:0:0:0")).toBe("[::1]");
    expect(reachableHost("127.0.0.2")).toBe("127.0.0.2");
    expect(reachableHost("::1")).toBe("[::1]");
    expect(reachableHost("fd00::5")).toBe("[fd00::5]");
    expect(reachableHost("fe80::1%eth0")).toBe("[fe80::1%25eth0]");
    expect(reachableHost("localhost")).toBe("localhost");
  });

  it("quotes a path as one shell word, whatever it holds", () => {
    expect(shellQuote("./data")).toBe("'./data'");
    expect(shellQuote("it's")).toBe(`'it'\\''s'`);
    for (const text of ["./key data", "it's", "$(rm -rf x)", "a\"b`c`\\d", "''"]) {
      expect(execFileSync("bash", ["-c", `printf %s ${shellQuote(text)}`], { encoding: "utf8" })).toBe(text);
    }
  });

  it("over plain HTTP: one line, no TLS options", () => {
    const lines = adminCurlLines({ host: "::", port: 8080, tokenFile: "./key data/admin-token", tls: null });
    expect(lines).toEqual([
      `Use it: curl -H "Authorization: Bearer $(cat './key data/admin-token')" -H 'content-type: application/json' -d '{"ownerId":"user_1","name":"first key"}' http://[::1]:8080/keygate.v1.KeyAdmin/CreateKey`,
    ]);
  });

  it("over TLS: https, --cacert with the listener's certificate, and a note; another for a client certificate", () => {
    const [line, ...notes] = adminCurlLines({ host: "0.0.0.0", port: 8443, tokenFile: "./data/admin-token", tls: { certFile: "/tls/tls.crt", clientAuth: true } });
    expect(line).toMatch(/^Use it: curl --cacert '\/tls\/tls\.crt' -H .* https:\/\/127\.0\.0\.1:8443\/keygate\.v1\.KeyAdmin\/CreateKey$/);
    expect(notes).toEqual([
      "  (the admin port serves TLS: --cacert names its certificate, KEYGATE_TLS_CERT_FILE; the CA that signed it works as well)",
      "  (the admin port asks for a client certificate, KEYGATE_TLS_CLIENT_AUTH_LISTENERS: add --cert and --key with one its CA signed)",
    ]);
  });
});
