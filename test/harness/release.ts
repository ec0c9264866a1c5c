import { execFileSync, spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, symlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";

const root = resolve(import.meta.dirname, "../..");

/** An earlier keygate release built from this repository's history, ready to run. */
export interface BuiltRelease {
  commit: string;
  /** Node's arguments that run its `keygate serve`. */
  serveArgs: readonly string[];
  remove(): void;
}

/** Whether git history holds `commit` (a shallow clone may not). */
export function releaseAvailable(commit: string): boolean {
  return spawnSync("git", ["-C", root, "cat-file", "-e", `${commit}^{commit}`], { stdio: "ignore" }).status === 0;
}

/**
 * Builds `commit`'s sources with this checkout's TypeScript and node_modules (the release's
 * package.json must pin the same dependencies: the caller checks that it does).
 */
export function buildRelease(commit: string): BuiltRelease {
  const dir = mkdtempSync(join(tmpdir(), `keygate-release-${commit}-`));
  try {
    const archive = execFileSync("git", ["-C", root, "archive", "--format=tar", commit, "src", "proto", "package.json", "tsconfig.json", "tsconfig.build.json"]);
    mkdirSync(dir, { recursive: true });
    execFileSync("tar", ["-x", "-C", dir], { input: archive });
    symlinkSync(join(root, "node_modules"), join(dir, "node_modules"), "dir");
    const built = spawnSync(join(root, "node_modules/.bin/tsc"), ["-p", "tsconfig.build.json"], { cwd: dir, encoding: "utf8" });
    if (built.status !== 0) throw new Error(`building ${commit} failed:\n${built.stdout}${built.stderr}`);
    const samePackages = spawnSync("git", ["-C", root, "diff", "--quiet", commit, "HEAD", "--", "package.json", "package-lock.json"]).status === 0;
    if (!samePackages) throw new Error(`${commit} pins other packages than this checkout: it cannot run on this node_modules`);
  } catch (error) {
    rmSync(dir, { recursive: true, force: true });
    throw error;
  }
  return { commit, serveArgs: [join(dir, "dist/cli.js"), "serve"], remove: () => rmSync(dir, { recursive: true, force: true }) };
}
