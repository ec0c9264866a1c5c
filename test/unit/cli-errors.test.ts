import { Code, ConnectError } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { serverFailure } from "../../src/cli/errors.js";
import { shownUrl, urlPasswords } from "../../src/cli/url.js";

// The line the CLI prints for a failed KeyAdmin call: the advice depends on whether keygate
// answered, whether the connection was ever made, and whether the call is a write that a blind
// retry would do twice once its answer is lost.

const URL = "http://127.0.0.1:8080";
const CREATE_CHECK = "keygate may have issued the key all the same: before retrying, look for it with keygate keys list --owner u1";

/** A ConnectError as connect-node makes one from Node's error `code` on `syscall`. */
function clientError(code: Code, nodeCode: string, syscall: string | undefined, message: string): ConnectError {
  const cause = Object.assign(new Error(message), { code: nodeCode, syscall });
  return new ConnectError(message, code, undefined, undefined, cause);
}

const refused = (): ConnectError => clientError(Code.Unavailable, "ECONNREFUSED", "connect", "connect ECONNREFUSED 127.0.0.1:8080");
const noHost = (): ConnectError => clientError(Code.Unavailable, "ENOTFOUND", "getaddrinfo", "getaddrinfo ENOTFOUND keygate.invalid");
const epipe = (): ConnectError => clientError(Code.Internal, "EPIPE", "write", "write EPIPE");
const reset = (): ConnectError => clientError(Code.Aborted, "ECONNRESET", "read", "read ECONNRESET");
const late = (): ConnectError => new ConnectError("the operation timed out", Code.DeadlineExceeded);

describe("serverFailure() for calls that never reached keygate.error", () => {
  it.each([
    ["refused", refused, "unavailable: connect ECONNREFUSED 127.0.0.1:8080"],
    ["no such host", noHost, "unavailable: getaddrinfo ENOTFOUND keygate.invalid"],
  ])("%s: asks whether keygate runs there; nothing was sent, so a write needs no check", (_label, error, message) => {
    expect(serverFailure(error(), URL, CREATE_CHECK).message).toBe(`${message}; is keygate running at ${URL}? (set --url or KEYGATE_URL)`);
  });
});

describe("serverFailure() for a connection that broke.error", () => {
  it.each([
    ["EPIPE", epipe, "internal: write EPIPE"],
    ["ECONNRESET", reset, "aborted: read ECONNRESET"],
  ])("%s: the connection failed, is it the admin port; not keygate's log", (_label, error, message) => {
    expect(serverFailure(error(), URL, null).message).toBe(`${message}; the connection to ${URL} failed: is it keygate's admin port? (set --url or KEYGATE_URL)`);
  });

  it("a write whose request may have gone out also says how to check before retrying", () => {
    expect(serverFailure(reset(), URL, CREATE_CHECK).message).toBe(
      `aborted: read ECONNRESET; the connection to ${URL} failed: is it keygate's admin port? (set --url or KEYGATE_URL); ${CREATE_CHECK}`,
    );
  });
});

describe("serverFailure() when the answer is lost or keygate could not finish.error", () => {
  it("a read past its deadline: retry", () => {
    expect(serverFailure(late(), URL, null).message).toBe(`deadline_exceeded: the operation timed out; keygate at ${URL} did not answer in time; retry`);
  });

  it("a write a repeat would do twice, past its deadline: the check, never a blind retry", () => {
    const message = serverFailure(late(), URL, CREATE_CHECK).message;
    expect(message).toBe(`deadline_exceeded: the operation timed out; keygate at ${URL} did not answer in time; ${CREATE_CHECK}`);
    expect(message).not.toContain("retry;");
  });

  it.each([Code.Unavailable, Code.Unknown])("code %s answered by keygate, for such a write: where keygate runs, then the check", (code) => {
    expect(serverFailure(new ConnectError("the store is not answering", code), URL, CREATE_CHECK).message).toMatch(
      new RegExp(`: the store is not answering; is keygate running at http://127\\.0\\.0\\.1:8080\\? \\(set --url or KEYGATE_URL\\); ${CREATE_CHECK}$`),
    );
  });

  it("a refusal keygate answered (nothing was done) has no check, whatever the call", () => {
    expect(serverFailure(new ConnectError("owner_id: required", Code.InvalidArgument), URL, CREATE_CHECK).message).toBe(
      "invalid_argument: owner_id: required; fix that value; --help lists the options",
    );
    expect(serverFailure(new ConnectError("boom", Code.Internal), URL, CREATE_CHECK).message).toBe("internal: boom; see keygate's log");
  });
});

describe("URLs as the CLI prints them: security", () => {
  it.each([
    ["http://127.0.0.1:8080", "http://127.0.0.1:8080"],
    ["https://keygate.example/admin", "https://keygate.example/admin"],
    ["http://ops:s3cret@127.0.0.1:8080", "http://***@127.0.0.1:8080"],
    ["https://s3cret@keygate.example", "https://***@keygate.example"],
    ["http://ops:s3@cr:et@host:1", "http://***@host:1"], // the last @ ends the userinfo, as the URL parser reads it
    ["ops:s3cret@127.0.0.1:8080", "***@127.0.0.1:8080"], // no scheme: the parser would read "ops:" as one
    ["http://ops:s3cret@bad host", "http://***@bad host"], // refused by the parser, printed in the usage error
  ])("%s is shown as %s", (url, shown) => {
    expect(shownUrl(url)).toBe(shown);
  });

  it("urlPasswords: the password as typed and percent-decoded, for redacting an unexpected error", () => {
    expect(urlPasswords("http://ops:p%40ss@host")).toEqual(["p%40ss", "p@ss"]);
    expect(urlPasswords("https://token@host")).toEqual(["token", "token"]);
    expect(urlPasswords("http://ops:%zz@host")).toEqual(["%zz", "%zz"]);
    expect(urlPasswords("http://host:8080")).toEqual([]);
  });
});
