import { spawnSync } from "node:child_process";
import { createRequire } from "node:module";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { afterEach, describe, expect, it } from "vitest";

// V8's own test of whether an object is in fast mode, which only a process started with
// --allow-natives-syntax can call: each case runs in a child process of its own, since the
// mode is the whole process's.
const FAST = `const isFast = new Function("o", "return %HasFastProperties(o)");`;
const src = (path: string): string => JSON.stringify(resolve(import.meta.dirname, "../../src", path));
// The probe runs from a temporary directory, so packages are imported by their resolved path.
const IOREDIS = JSON.stringify(pathToFileURL(createRequire(import.meta.url).resolve("ioredis")).href);

const dirs: string[] = [];
afterEach(() => {
  for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true });
});

/** Runs the lines as an ES module under tsx with natives syntax; returns what it printed as JSON. */
function run(lines: string[]): unknown {
  const dir = mkdtempSync(join(tmpdir(), "kg-proto-"));
  dirs.push(dir);
  const file = join(dir, "probe.mjs");
  writeFileSync(file, [FAST, ...lines].join("\n"));
  const child = spawnSync(process.execPath, ["--allow-natives-syntax", "--import", "tsx", file], { encoding: "utf8", timeout: 60_000, env: { ...process.env, KEYGATE_DATA_DIR: dir } });
  // A warning on stderr (an experimental API, say) is not a failure; a non-zero exit is, with stderr to say why.
  expect(child.status, child.stderr).toBe(0);
  return JSON.parse(child.stdout.trim());
}

describe("String.prototype's mode", () => {
  it("ioredis's import leaves String.prototype a dictionary, and restoreFastStringPrototype makes it fast", () => {
    const result = run([
      `const before = isFast(String.prototype);`,
      `await import(${IOREDIS});`,
      `const afterImport = isFast(String.prototype);`,
      // Method calls on primitive strings alone do not make it fast again.
      `let sum = 0; for (let i = 0; i < 10000; i++) sum += ("ab" + (i & 7)).charCodeAt(2);`,
      `const afterUse = isFast(String.prototype);`,
      `const { restoreFastStringPrototype } = await import(${src("server/string-prototype.ts")});`,
      `restoreFastStringPrototype();`,
      `console.log(JSON.stringify({ before, afterImport, afterUse, restored: isFast(String.prototype), sum: sum > 0 }));`,
    ]);
    expect(result).toEqual({ before: true, afterImport: false, afterUse: false, restored: true, sum: true });
  });

  it("a built keygate has String.prototype in fast mode", () => {
    const result = run([
      `const { buildKeygate } = await import(${src("server/app.ts")});`,
      `const { loadConfig } = await import(${src("config.ts")});`,
      `const { createLogger } = await import(${src("server/logger.ts")});`,
      `const { Writable } = await import("node:stream");`,
      `const loaded = isFast(String.prototype);`,
      `const silent = new Writable({ write(_chunk, _encoding, callback) { callback(); } });`,
      `const app = await buildKeygate(loadConfig({ KEYGATE_DATA_DIR: process.env.KEYGATE_DATA_DIR }), { logger: createLogger("info", silent), defaultMetrics: false });`,
      `const built = isFast(String.prototype);`,
      `await app.stop();`,
      `console.log(JSON.stringify({ loaded, built }));`,
    ]);
    expect(result).toEqual({ loaded: false, built: true });
  });
});
