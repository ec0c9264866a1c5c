import { execFileSync, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, symlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { satisfies, validRange } from "semver";
import { z } from "zod";

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

const ranges = z.record(z.string(), z.string()).optional();
const lockfile = z.object({
  packages: z.record(
    z.string(),
    z.looseObject({ version: z.string().optional(), dependencies: ranges, optionalDependencies: ranges, peerDependencies: ranges, devDependencies: ranges }),
  ),
});

function readLock(path: string): z.infer<typeof lockfile> {
  return lockfile.parse(JSON.parse(readFileSync(path, "utf8")));
}

/**
 * Why the release could not run on this checkout's node_modules: a package it installs that is
 * missing here, or here at another version that some range in the release's own lock (its
 * package.json's or a dependent's) does not accept. Packages only this checkout added are not
 * looked at: the release never imports them.
 */
export function lockIncompatibilities(releaseLockPath: string, currentLockPath: string): string[] {
  const release = readLock(releaseLockPath).packages;
  const current = readLock(currentLockPath).packages;
  const asked = new Map<string, string[]>();
  for (const entry of Object.values(release)) {
    for (const deps of [entry.dependencies, entry.optionalDependencies, entry.peerDependencies, entry.devDependencies]) {
      for (const [name, range] of Object.entries(deps ?? {})) asked.set(name, [...(asked.get(name) ?? []), range]);
    }
  }
  const problems: string[] = [];
  for (const [path, entry] of Object.entries(release)) {
    if (path === "") continue;
    const here = current[path]?.version;
    if (here === undefined) {
      problems.push(`${path} is not installed here`);
      continue;
    }
    if (here === entry.version) continue;
    const name = path.slice(path.lastIndexOf("node_modules/") + "node_modules/".length);
    // An alias (npm:…) or a URL is no semver range: then only the same version will do.
    const refused = (asked.get(name) ?? [""]).filter((range) => validRange(range) === null || !satisfies(here, range));
    if (refused.length > 0) problems.push(`${path} is ${here} here, the release has ${entry.version ?? "none"} (asked: ${refused.join(", ")})`);
  }
  return problems;
}

/**
 * Builds `commit`'s sources with this checkout's TypeScript and node_modules. Every package the
 * release installs must be here at a version its lock accepts (it is refused otherwise: it could
 * not run on them); packages this checkout added since do not matter.
 */
export function buildRelease(commit: string): BuiltRelease {
  const archive = releaseSources(commit);
  if (!existsSync(archive)) throw new Error(`no sources of release ${commit} at ${archive}`);
  const dir = mkdtempSync(join(tmpdir(), `keygate-release-${commit}-`));
  try {
    execFileSync("tar", ["-xzf", archive, "-C", dir]);
    const problems = lockIncompatibilities(join(dir, "package-lock.json"), join(root, "package-lock.json"));
    if (problems.length > 0) throw new Error(`release ${commit} cannot run on this node_modules: ${problems.join("; ")}`);
    symlinkSync(join(root, "node_modules"), join(dir, "node_modules"), "dir");
    const built = spawnSync(join(root, "node_modules/.bin/tsc"), ["-p", "tsconfig.build.json"], { cwd: dir, encoding: "utf8" });
    if (built.status !== 0) throw new Error(`building ${commit} failed:\n${built.stdout}${built.stderr}`);
  } catch (error) {
    rmSync(dir, { recursive: true, force: true });
    throw error;
  }
  return { commit, serveArgs: [join(dir, "dist/cli.js"), "serve"], remove: () => rmSync(dir, { recursive: true, force: true }) };
}
