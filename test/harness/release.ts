import { execFileSync, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, symlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";

const root = resolve(import.meta.dirname, "../..");

/** An earlier keygate release built from its committed sources, ready to run. */
export interface BuiltRelease {
  commit: string;
  /** Node's arguments that run its `keygate serve`. */
  serveArgs: readonly string[];
  remove(): void;
}

/**
 * The release's sources as `git archive` gave them (src, proto, package files, tsconfigs),
 * committed beside its upgrade fixture so that a clone without history can still build it:
 *
 *   git archive --format=tar.gz 1dffb08 src proto package.json package-lock.json tsconfig.json \
 *     tsconfig.build.json > test/fixtures/upgrade/1dffb08/release-src.tar.gz
 */
export function releaseSources(commit: string): string {
  return join(root, "test/fixtures/upgrade", commit, "release-src.tar.gz");
}

/**
 * Builds `commit`'s sources with this checkout's TypeScript and node_modules. The release must
 * pin the same packages as this checkout (it is refused otherwise: it could not run on them).
 */
export function buildRelease(commit: string): BuiltRelease {
  const archive = releaseSources(commit);
  if (!existsSync(archive)) throw new Error(`no sources of release ${commit} at ${archive}`);
  const dir = mkdtempSync(join(tmpdir(), `keygate-release-${commit}-`));
  try {
    execFileSync("tar", ["-xzf", archive, "-C", dir]);
    for (const file of ["package.json", "package-lock.json"]) {
      if (!readFileSync(join(dir, file)).equals(readFileSync(join(root, file)))) {
        throw new Error(`release ${commit} pins other packages than this checkout (${file} differs): it cannot run on this node_modules`);
      }
    }
    symlinkSync(join(root, "node_modules"), join(dir, "node_modules"), "dir");
    const built = spawnSync(join(root, "node_modules/.bin/tsc"), ["-p", "tsconfig.build.json"], { cwd: dir, encoding: "utf8" });
    if (built.status !== 0) throw new Error(`building ${commit} failed:\n${built.stdout}${built.stderr}`);
  } catch (error) {
    rmSync(dir, { recursive: true, force: true });
    throw error;
  }
  return { commit, serveArgs: [join(dir, "dist/cli.js"), "serve"], remove: () => rmSync(dir, { recursive: true, force: true }) };
}
