import { existsSync } from "node:fs";
import { homedir } from "node:os";
import { join, resolve } from "node:path";

const root = resolve(import.meta.dirname, "../..");

/** An earlier keygate release, built from its committed sources on its own dependency tree, ready to run. */
export interface BuiltRelease {
  commit: string;
  /** Node's arguments that run its `keygate serve`. */
  serveArgs: readonly string[];
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

/** Where .ci/install-release.sh builds `commit`: the release's own node_modules and dist/. */
function releaseDir(commit: string): string {
  const cacheDir = process.env["KEYGATE_CACHE_DIR"] ?? join(homedir(), ".cache/keygate");
  return join(cacheDir, `release-${commit}`);
}

/** Whether .ci/install-release.sh has built `commit`. */
export function releaseInstalled(commit: string): boolean {
  return existsSync(join(releaseDir(commit), ".installed")) && existsSync(join(releaseDir(commit), "dist/cli.js"));
}

/**
 * The release as .ci/install-release.sh built it. It pins packages this checkout no longer has
 * (better-sqlite3), so it runs on its own node_modules, never this checkout's.
 */
export function installedRelease(commit: string): BuiltRelease {
  if (!existsSync(releaseSources(commit))) throw new Error(`no sources of release ${commit} at ${releaseSources(commit)}`);
  if (!releaseInstalled(commit)) throw new Error(`release ${commit} is not built: run \`bash .ci/install-release.sh ${commit}\``);
  return { commit, serveArgs: [join(releaseDir(commit), "dist/cli.js"), "serve"] };
}
