import { existsSync, readFileSync } from "node:fs";
import { resolve } from "node:path";
import { describe, expect, it } from "vitest";

const root = resolve(import.meta.dirname, "../..");
const readme = readFileSync(resolve(root, "README.md"), "utf8");

describe("README", () => {
  it("every file or folder under deploy/, scripts/, test/ or proto/ that it names exists", () => {
    const paths = [...readme.matchAll(/(?<![\w/])((?:deploy|scripts|test|proto|\.ci)\/[\w./-]*[\w/])/g)].map((m) => m[1] ?? "");
    expect(paths.length).toBeGreaterThan(10);
    const missing = [...new Set(paths)].filter((p) => !existsSync(resolve(root, p)));
    expect(missing).toEqual([]);
  });

  it("every KEYGATE_* variable the code reads is in the environment table", () => {
    const config = readFileSync(resolve(root, "src/config.ts"), "utf8");
    const variables = [...new Set([...config.matchAll(/\b(KEYGATE_[A-Z_]+):/g)].map((m) => m[1] ?? ""))];
    expect(variables.length).toBeGreaterThan(10);
    for (const variable of variables) expect(readme, variable).toContain(`| \`${variable}\``);
  });

  it("every npm script it runs exists", () => {
    const pkg: unknown = JSON.parse(readFileSync(resolve(root, "package.json"), "utf8"));
    const scripts = typeof pkg === "object" && pkg !== null && "scripts" in pkg && typeof pkg.scripts === "object" && pkg.scripts !== null ? Object.keys(pkg.scripts) : [];
    const used = [...readme.matchAll(/npm run ([\w:-]+)/g)].map((m) => m[1] ?? "");
    for (const script of used) expect(scripts, script).toContain(script);
  });
});
