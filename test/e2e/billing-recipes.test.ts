import { execFile } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, symlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { builtCli } from "../harness/built-cli.js";
import { spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";

// README "Billing recipes", run as written: each "### " recipe is one ```sh block and the ```text
// block after it. The block's first line starts keygate (`KEYGATE_CONFIG=… KEYGATE_DATA_DIR=… npm
// start`): here it is `node dist/cli.js serve` with those variables, on ports 0 instead of the
// defaults. The rest runs with bash in a checkout of its own, the default ports in the commands
// replaced by the bound ones, and must print exactly the text block.

const root = resolve(import.meta.dirname, "../..");
const readme = readFileSync(join(root, "README.md"), "utf8");
// The defaults, as the README's port table gives them (test/e2e/readme-commands.test.ts reads it).
const DEFAULT_PORTS = { admin: 8080, http: 8181, grpc: 9191 };

interface Recipe {
  title: string;
  start: { config: string; dataDir: string };
  script: string;
  expected: string;
}

function recipes(): Recipe[] {
  const start = readme.indexOf("\n## Billing recipes\n");
  if (start < 0) throw new Error('README has no "## Billing recipes" section');
  const end = readme.indexOf("\n## ", start + 1);
  const section = readme.slice(start, end < 0 ? undefined : end);
  return section
    .split("\n### ")
    .slice(1)
    .map((part) => {
      const title = part.slice(0, part.indexOf("\n"));
      const sh = /```sh\n([\s\S]*?)```/.exec(part)?.[1];
      const text = /```text\n([\s\S]*?)```/.exec(part)?.[1];
      if (sh === undefined || text === undefined) throw new Error(`recipe "${title}" needs a sh block and a text block`);
      const [first = "", ...rest] = sh.trimEnd().split("\n");
      const launch = /^KEYGATE_CONFIG=(\S+) KEYGATE_DATA_DIR=(\S+) npm start$/.exec(first);
      if (launch === null) throw new Error(`recipe "${title}" must start keygate on its first line, not: ${first}`);
      return { title, start: { config: launch[1] ?? "", dataDir: launch[2] ?? "" }, script: rest.join("\n"), expected: text };
    });
}

const servers: KeygateProcess[] = [];
const dirs: string[] = [];

afterAll(async () => {
  await Promise.all(servers.map((server) => server.stop("SIGTERM")));
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

/** The environment without inherited KEYGATE_* variables; npx must not reach the registry. */
function cleanEnv(extra: Record<string, string>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [name, value] of Object.entries(process.env)) if (!name.startsWith("KEYGATE_")) env[name] = value;
  return Object.assign(env, { npm_config_offline: "true", npm_config_update_notifier: "false" }, extra);
}

/** Starts keygate as the recipe's first line says, in `cwd`, from dist/ as `npm start` runs it. */
async function startServer(cwd: string, recipe: Recipe): Promise<{ admin: number; http: number; grpc: number }> {
  const server = await spawnKeygate({
    cwd,
    args: [builtCli(), "serve"],
    env: {
      KEYGATE_CONFIG: recipe.start.config,
      KEYGATE_DATA_DIR: recipe.start.dataDir,
      KEYGATE_HOST: "127.0.0.1",
      KEYGATE_GRPC_PORT: "0",
      KEYGATE_HTTP_AUTHZ_PORT: "0",
      KEYGATE_ADMIN_PORT: "0",
    },
  });
  servers.push(server);
  return server.ports;
}

function bash(cwd: string, script: string): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((done, fail) => {
    execFile("bash", ["-c", script], { cwd, env: cleanEnv({}), timeout: 120_000 }, (error, stdout, stderr) => {
      if (error === null) done({ code: 0, stdout, stderr });
      else if (typeof error.code === "number") done({ code: error.code, stdout, stderr });
      else fail(new Error(`bash did not exit normally (${error.message})\n${stdout}\n${stderr}`));
    });
  });
}

describe("README billing recipes", { timeout: 180_000 }, () => {
  // Fails by name when dist/ is missing or older than src/ (`npm run build` makes it).
  builtCli();
  const all = recipes();

  it("has one recipe per example policy in deploy/config", () => {
    expect(all.map((r) => r.start.config).sort()).toEqual(["deploy/config/daily-message-tiers.yaml", "deploy/config/monthly-credits.yaml", "deploy/config/role-rate-tiers.yaml"]);
  });

  for (const recipe of all) {
    it(`${recipe.title}: prints what the README shows`, async () => {
      // A checkout of its own: the project's files linked in, its own data directory.
      const cwd = mkdtempSync(join(tmpdir(), "keygate-recipe-"));
      dirs.push(cwd);
      for (const name of ["package.json", "node_modules", "dist", "proto", "deploy"]) symlinkSync(join(root, name), join(cwd, name));
      const ports = await startServer(cwd, recipe);
      const bound = new Map([
        [DEFAULT_PORTS.admin, ports.admin],
        [DEFAULT_PORTS.http, ports.http],
        [DEFAULT_PORTS.grpc, ports.grpc],
      ]);
      const script = recipe.script.replace(/\b127\.0\.0\.1:(\d+)\b/g, (whole, port: string) => {
        const to = bound.get(Number(port));
        return to === undefined ? whole : `127.0.0.1:${to}`;
      });
      const run = await bash(cwd, `set -o pipefail\n${script}`);
      // `keys create --quiet` warns on stderr that the secret is shown once; nothing else may be there.
      expect(run.stderr.split("\n").filter((line) => line !== "" && !/^keygate: store the secret of key_\w+ now/.test(line))).toEqual([]);
      expect(run.stdout).toBe(recipe.expected);
      expect(run.code).toBe(0);
    });
  }
});
