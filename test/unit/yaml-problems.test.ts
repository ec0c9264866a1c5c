import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, describe, expect, it, vi } from "vitest";
import { loadTokensFile } from "../../src/admin/permissions.js";
import { ConfigError, loadPolicyFile, parseYamlText } from "../../src/config.js";

// The yaml library quotes the text in its messages (an alias's or a tag's name, a source excerpt)
// and prints warnings through process.emitWarning, outside the log. keygate's files are read so
// that a problem is told by code and place only, and nothing reaches process warnings.

const dir = mkdtempSync(join(tmpdir(), "keygate-yaml-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
afterEach(() => vi.restoreAllMocks());

function file(name: string, text: string): string {
  const path = join(dir, name);
  writeFileSync(path, text);
  return path;
}

const TOKEN = "Qv7Lm2Xs9Pk4Rt8Wz3Nb6Hc1Jd5Fg";

describe("YAML text happy", () => {
  it("reads a document, aliases of earlier anchors included", () => {
    expect(parseYamlText("read: &perms [keys:read]\nagain: *perms\n")).toEqual({ ok: true, value: { read: ["keys:read"], again: ["keys:read"] } });
    expect(parseYamlText("")).toEqual({ ok: true, value: null });
  });
});

describe("YAML text error", () => {
  it.each([
    ["an alias with no anchor", `a:\n  b: *${TOKEN}\n`, { code: "BAD_ALIAS", line: 2, column: 6, field: "a.b" }],
    ["an unknown tag", `a:\n  - !${TOKEN}\n`, { code: "TAG_RESOLVE_FAILED", line: 2, column: 5 }],
    ["a second document", "a: 1\n---\nb: 2\n", { code: "MULTIPLE_DOCS", line: 2, column: 1 }],
    ["a key twice", "plans:\n  basic: 1\n  basic: 2\n", { code: "DUPLICATE_KEY", line: 3, column: 3, field: "plans.basic" }],
  ])("%s fails by code and place, quoting none of the text", (_what, text, problem) => {
    const warned = vi.spyOn(process, "emitWarning");
    const result = parseYamlText(text);
    expect(result).toMatchObject({ ok: false, problem });
    expect(JSON.stringify(result)).not.toContain(TOKEN);
    expect(warned).not.toHaveBeenCalled();
  });

  it("an alias expansion past the library's cap fails, not the process", () => {
    const nine = (name: string): string => `[${Array.from({ length: 9 }, () => `*${name}`).join(",")}]`;
    const text = `a: &a [x,x,x,x,x,x,x,x,x]\nb: &b ${nine("a")}\nc: &c ${nine("b")}\nd: ${nine("c")}\n`;
    expect(parseYamlText(text)).toEqual({ ok: false, problem: { code: "RESOURCE_EXHAUSTION", line: null, column: null, field: "" } });
  });
});

describe("the policy file error", () => {
  it("an unknown tag is a ConfigError naming code, place and field, with no process warning", () => {
    const warned = vi.spyOn(process, "emitWarning");
    const path = file("policy.yaml", "defaultPlan: basic\nscopes:\n  catalog: [read]\n  default: !reed\n");
    expect(() => loadPolicyFile(path)).toThrow(ConfigError);
    expect(() => loadPolicyFile(path)).toThrow(`KEYGATE_CONFIG: ${path} is not valid YAML: TAG_RESOLVE_FAILED at line 4, column 12 (quote a value that starts with "*" or "!"), in scopes.default`);
    expect(warned).not.toHaveBeenCalled();
  });

  it("a syntax error names no source excerpt", () => {
    const path = file("policy-indent.yaml", "routes:\n  - requiredScopes: [read\n");
    expect(() => loadPolicyFile(path)).toThrow(`KEYGATE_CONFIG: ${path} is not valid YAML: BAD_INDENT at line 3, column 1`);
  });
});

describe("the admin tokens file security", () => {
  it.each([
    ["*", "BAD_ALIAS"],
    ["!", "TAG_RESOLVE_FAILED"],
  ])("a token written unquoted after %s is named by code and place only", (indicator, code) => {
    const warned = vi.spyOn(process, "emitWarning");
    const path = file(`tokens-${code}.yaml`, `tokens:\n  - name: billing\n    token: ${indicator}${TOKEN}\n    permissions: [verify]\n`);
    expect(() => loadTokensFile(path)).toThrow(`KEYGATE_ADMIN_TOKENS_FILE: cannot read ${path} as YAML: ${code} at line 3, column 12 (quote a value that starts with "*" or "!")`);
    expect(warned).not.toHaveBeenCalled();
  });
});
