import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { lockIncompatibilities } from "../harness/release.js";

const dir = mkdtempSync(join(tmpdir(), "keygate-locks-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

let n = 0;
function lock(packages: Record<string, unknown>): string {
  const path = join(dir, `lock-${++n}.json`);
  writeFileSync(path, JSON.stringify({ lockfileVersion: 3, packages }));
  return path;
}

const release = lock({
  "": { dependencies: { zod: "^4.6.7", "sqlite-napi": "npm:better-sqlite3@^13.2.0" } },
  "node_modules/zod": { version: "4.6.7" },
  "node_modules/prom-client": { version: "15.1.3", dependencies: { "@opentelemetry/api": "^1.4.0" } },
  "node_modules/@opentelemetry/api": { version: "1.10.0" },
  "node_modules/sqlite-napi": { version: "13.2.0" },
});

describe("release lock happy", () => {
  it("accepts this checkout's added packages and versions every range in the release's lock accepts", () => {
    const current = lock({
      "": { dependencies: { zod: "^4.6.7", extra: "^1.0.0" } },
      "node_modules/zod": { version: "4.6.7" },
      "node_modules/prom-client": { version: "15.1.3" },
      "node_modules/@opentelemetry/api": { version: "1.9.1" },
      "node_modules/sqlite-napi": { version: "13.2.0" },
      "node_modules/extra": { version: "1.0.0" },
    });
    expect(lockIncompatibilities(release, current)).toEqual([]);
  });
});

describe("release lock error", () => {
  it("names a package that is missing, one its ranges refuse, and a changed alias", () => {
    const current = lock({
      "": {},
      "node_modules/zod": { version: "3.25.0" },
      "node_modules/@opentelemetry/api": { version: "1.10.0" },
      "node_modules/sqlite-napi": { version: "13.3.0" },
    });
    expect(lockIncompatibilities(release, current)).toEqual([
      "node_modules/zod is 3.25.0 here, the release has 4.6.7 (asked: ^4.6.7)",
      "node_modules/prom-client is not installed here",
      "node_modules/sqlite-napi is 13.3.0 here, the release has 13.2.0 (asked: npm:better-sqlite3@^13.2.0)",
    ]);
  });
});
