import { execFile } from "node:child_process";
import { existsSync, readdirSync, statSync } from "node:fs";
import { join, relative, resolve } from "node:path";

const root = resolve(import.meta.dirname, "../..");
const src = join(root, "src");
const dist = join(root, "dist");

/** The compiled CLI: what `npm start` and the package's bin run. */
export const BUILT_CLI = join(dist, "cli.js");

/** Why dist/ does not hold a build of the current src/, or null when it does. */
function staleness(): string | null {
  if (!existsSync(BUILT_CLI)) return "dist/cli.js is missing";
  for (const entry of readdirSync(src, { recursive: true, withFileTypes: true })) {
    if (!entry.isFile() || !entry.name.endsWith(".ts") || entry.name.endsWith(".d.ts")) continue;
    const source = join(entry.parentPath, entry.name);
    const output = join(dist, relative(src, source)).replace(/\.ts$/, ".js");
    const name = (path: string): string => relative(root, path);
    if (!existsSync(output)) return `${name(output)} is missing (${name(source)} was never built)`;
    // tsc writes every output on each build, so an older output means its source changed since.
    if (statSync(output).mtimeMs < statSync(source).mtimeMs) return `${name(output)} is older than ${name(source)}`;
  }
  return null;
}

let checked = false;

/**
 * The compiled CLI's path, once dist/ is known to be built from the current src/. Spawned
 * keygates run dist/ as operators do (never the sources through a loader), so a missing or stale
 * build fails the test here, by name, instead of testing old code.
 */
export function builtCli(): string {
  if (checked) return BUILT_CLI;
  const stale = staleness();
  if (stale !== null) throw new Error(`${stale}: tests spawn the compiled CLI; run \`npm run build\` first`);
  checked = true;
  return BUILT_CLI;
}

/** What a CLI run printed, and the code it exited with. */
export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/**
 * Runs the built `keygate <args>` against `url` with `adminToken`, from the repository root and with
 * stdin closed. Inherited KEYGATE_* variables are dropped, so only these two reach it. Resolves
 * on any exit code; rejects when the CLI did not exit by itself (killed after `timeoutMs`).
 */
export function runBuiltCli(args: readonly string[], options: { url: string; adminToken: string; timeoutMs: number }): Promise<CliResult> {
  const env: NodeJS.ProcessEnv = {};
  for (const [name, value] of Object.entries(process.env)) if (!name.startsWith("KEYGATE_")) env[name] = value;
  Object.assign(env, { KEYGATE_URL: options.url, KEYGATE_ADMIN_TOKEN: options.adminToken });
  return new Promise((done, fail) => {
    const child = execFile(process.execPath, [builtCli(), ...args], { env, cwd: root, timeout: options.timeoutMs }, (error, stdout, stderr) => {
      if (error === null) done({ code: 0, stdout, stderr });
      else if (typeof error.code === "number") done({ code: error.code, stdout, stderr });
      else fail(new Error(`keygate ${args.join(" ")} did not exit normally (${error.message}):\n${stdout}\n${stderr}`));
    });
    child.stdin?.end();
  });
}
