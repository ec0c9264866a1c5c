import { execFile, spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, statSync, symlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";
import { loadConfig } from "../../src/config.js";
import { KEYGATE_NODE_FLAGS } from "../../src/server/node-flags.js";
import { builtCli } from "../harness/built-cli.js";
import { listeningPorts } from "../harness/process.js";

// The README read as a new user would: every ```sh command of "Quick start", "KeyAdmin examples"
// and "CLI", taken from README.md by heading, run in order with bash against one keygate, as
// one shell session typing them would. Only three things are changed, each in one place below:
// the listen ports (PORTS), the `…` placeholders (fill) and a curl wrapper (CURL_WRAPPER).

const root = resolve(import.meta.dirname, "../..");
const SECTIONS = ["Quick start", "KeyAdmin examples", "CLI"] as const;
// Commands for tools a test machine does not have; none of SECTIONS uses one today.
const EXTERNAL_TOOLS = ["docker", "docker-compose", "kubectl", "kustomize", "helm", "kind", "envoy", "istioctl"];

const KEY_ID = /^key_[0-9A-HJKMNP-TV-Z]{26}$/;
const SECRET = /kg_(?:live|test)_[0-9A-Za-z]{38}/;

// ---- the README, by heading ---------------------------------------------------------------------

/** The commands of every ```sh block under each `## ` heading; fenced lines are never headings. */
function shCommandsBySection(markdown: string): Map<string, string[][]> {
  const sections = new Map<string, string[][]>();
  let heading = "";
  let open: { sh: boolean; lines: string[] } | null = null;
  for (const line of markdown.split("\n")) {
    if (open !== null) {
      if (line.startsWith("```")) {
        if (open.sh) sections.set(heading, [...(sections.get(heading) ?? []), commandsOf(open.lines.join("\n"))]);
        open = null;
      } else open.lines.push(line);
      continue;
    }
    if (line.startsWith("```")) open = { sh: line.trim() === "```sh", lines: [] };
    const title = /^## (.+)$/.exec(line)?.[1];
    if (title !== undefined) heading = title.trim();
  }
  return sections;
}

/** A block's commands: continuation lines joined, blank and comment-only lines dropped. */
function commandsOf(block: string): string[] {
  return block
    .replace(/\s*\\\n\s*/g, " ")
    .split("\n")
    .map((line) => line.trim())
    .filter((line) => line !== "" && !line.startsWith("#"));
}

const readme = readFileSync(join(root, "README.md"), "utf8");
const bySection = shCommandsBySection(readme);

/** The section's text, for the port table (Quick start). */
function sectionText(title: string): string {
  const start = readme.indexOf(`\n## ${title}\n`);
  const end = readme.indexOf("\n## ", start + 1);
  if (start < 0) throw new Error(`README has no "## ${title}" section`);
  return readme.slice(start, end < 0 ? undefined : end);
}

interface Ports {
  grpc: number;
  http: number;
  admin: number;
}

/** The Quick start's port table: the listener each default port belongs to. */
function readmePorts(): Ports {
  const rows = [...sectionText("Quick start").matchAll(/^\| (\d+) \| ([^|]+) \| ([^|]+) \|$/gm)];
  const find = (what: RegExp): number => Number(rows.find((row) => what.test(`${row[2] ?? ""}|${row[3] ?? ""}`))?.[1] ?? NaN);
  return { grpc: find(/Authorization\/Check/), http: find(/HTTP authorization/), admin: find(/KeyAdmin/) };
}

// ---- the one keygate, in a view of the checkout -------------------------------------------------

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/** What earlier commands printed that later ones use. */
interface Session {
  cwd: string;
  ports: Ports;
  /** The README's variable assignments so far, replayed before each command (one shell session). */
  assignments: string[];
  /** The id of the key the latest create printed: fills `key_…`. */
  keyId: string | null;
  /** The latest secret any command printed: fills `kg_live_…`. */
  secret: string | null;
}

const session: Session = { cwd: "", ports: { grpc: 0, http: 0, admin: 0 }, assignments: [], keyId: null, secret: null };
let server: ChildProcess | null = null;
let serverOut = "";

/** The environment without inherited KEYGATE_* variables: the README's commands set their own. */
function cleanEnv(extra: Record<string, string>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [name, value] of Object.entries(process.env)) if (!name.startsWith("KEYGATE_")) env[name] = value;
  // An `npx` that does not resolve in the checkout must fail here, not fetch from the registry.
  return Object.assign(env, { npm_config_offline: "true", npm_config_update_notifier: "false" }, extra);
}

/**
 * `npm install && npm start`, minus the install: node_modules is already installed, and a second
 * `npm install` would rewrite the shared checkout's tree. `npm start` is `prestart` (`npm run
 * build`, done here when dist/cli.js is missing) and then `node <KEYGATE_NODE_FLAGS> dist/cli.js serve`, run as is.
 * Only the ports change: 0 instead of the defaults, so parallel suites cannot collide.
 */
async function quickStart(cwd: string): Promise<Ports> {
  const env = cleanEnv({ KEYGATE_HOST: "127.0.0.1", KEYGATE_GRPC_PORT: "0", KEYGATE_HTTP_AUTHZ_PORT: "0", KEYGATE_ADMIN_PORT: "0" });
  const child = spawn(process.execPath, [...KEYGATE_NODE_FLAGS, builtCli(), "serve"], { cwd, env, stdio: ["ignore", "pipe", "pipe"] });
  server = child;
  let err = "";
  child.stdout.on("data", (chunk: Buffer) => (serverOut += chunk.toString()));
  child.stderr.on("data", (chunk: Buffer) => (err += chunk.toString()));
  const started = performance.now();
  for (;;) {
    const ports = listeningPorts(serverOut);
    if (ports !== null) return ports;
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`node dist/cli.js serve exited:\n${serverOut}\n${err}`);
    if (performance.now() - started > 30_000) throw new Error(`node dist/cli.js serve did not start within 30 s:\n${serverOut}\n${err}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

beforeAll(async () => {
  // Fails by name when dist/ is missing or older than src/ (`npm run build` makes it).
  builtCli();
  // The README's commands run in a checkout (`cat data/admin-token`, `npx keygate`, `--schema
  // proto`). This directory is one: the checkout's files linked in, and its own ./data.
  session.cwd = mkdtempSync(join(tmpdir(), "keygate-readme-"));
  for (const name of ["package.json", "node_modules", "dist", "proto"]) symlinkSync(join(root, name), join(session.cwd, name));
  session.ports = await quickStart(session.cwd);
}, 120_000);

afterAll(async () => {
  const child = server;
  if (child !== null && child.exitCode === null && child.signalCode === null) {
    const exited = new Promise((done) => child.once("exit", done));
    child.kill("SIGTERM");
    await exited;
  }
  if (session.cwd !== "") rmSync(session.cwd, { recursive: true, force: true });
});

// ---- the three changes to a command ---------------------------------------------------------------

/** The README's default ports, in its commands, replaced by the ports keygate bound. */
function withBoundPorts(command: string): string {
  const defaults = readmePorts();
  const bound = new Map([
    [defaults.grpc, session.ports.grpc],
    [defaults.http, session.ports.http],
    [defaults.admin, session.ports.admin],
  ]);
  return command.replace(/\b(127\.0\.0\.1|localhost):(\d+)\b/g, (whole, host: string, port: string) => {
    const to = bound.get(Number(port));
    return to === undefined ? whole : `${host}:${to}`;
  });
}

/** `key_…` and `kg_live_…` filled from what earlier commands printed; any other `…` is an error. */
function fill(command: string): string {
  const filled = command
    .replaceAll("key_…", () => session.keyId ?? "key_UNKNOWN(no key created before this command)")
    .replaceAll("kg_live_…", () => session.secret ?? "kg_live_UNKNOWN(no secret printed before this command)");
  expect(filled, "a placeholder this test does not know how to fill").not.toContain("…");
  return filled;
}

// Instrumentation, not the README's: curl fails on an HTTP error status (so the exit code means
// something) and prints the status on a last line of its own.
const CURL_WRAPPER = `curl() { command curl --silent --show-error --fail-with-body --write-out '\\n%{http_code}\\n' "$@"; }`;

function bash(script: string): Promise<Run> {
  return new Promise((done, fail) => {
    execFile("bash", ["-c", script], { cwd: session.cwd, env: cleanEnv({}), timeout: 60_000 }, (error, stdout, stderr) => {
      if (error === null) done({ code: 0, stdout, stderr });
      else if (typeof error.code === "number") done({ code: error.code, stdout, stderr });
      else fail(new Error(`bash did not exit normally (${error.message}):\n${script}\n${stdout}\n${stderr}`));
    });
  });
}

function runInSession(command: string): Promise<Run> {
  return bash([CURL_WRAPPER, ...session.assignments, command].join("\n"));
}

// ---- what each command must answer ------------------------------------------------------------

/** The request JSON of a `-d '…'` argument, with snake_case field names camelCased. */
function requestOf(command: string): Record<string, unknown> {
  const body = /-d '([^']*)'/.exec(command)?.[1];
  if (body === undefined) return {};
  const parsed = z.record(z.string(), z.unknown()).parse(JSON.parse(body));
  return Object.fromEntries(Object.entries(parsed).map(([name, value]) => [name.replace(/_([a-z])/g, (_m, c: string) => c.toUpperCase()), value]));
}

/** curl's output under CURL_WRAPPER: the status from the last line, headers (with -i), the body. */
function curlAnswer(stdout: string): { status: number; headers: string; body: string } {
  const text = stdout.replace(/\n$/, "");
  const cut = text.lastIndexOf("\n");
  let body = text.slice(0, cut);
  let headers = "";
  if (body.startsWith("HTTP/")) {
    const end = body.indexOf("\r\n\r\n");
    headers = body.slice(0, end);
    body = body.slice(end + 4);
  }
  return { status: Number(text.slice(cut + 1)), headers, body };
}

function jsonOf(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    throw new Error(`not JSON: ${text}`);
  }
}

const created = z.object({ key: z.object({ id: z.string() }) });

/** Remembers what later commands need: the created key's id, the latest secret. */
function remember(command: string, run: Run): void {
  const secrets = run.stdout.match(new RegExp(SECRET.source, "g")) ?? [];
  const secret = secrets.at(-1);
  if (secret !== undefined) session.secret = secret;
  if (/\/CreateKey\b/.test(command)) {
    const text = command.startsWith("npx buf ") ? run.stdout : curlAnswer(run.stdout).body;
    let answer: unknown = null;
    try {
      answer = JSON.parse(text);
    } catch {
      // Not an answer: expectAnswer reports it.
    }
    const parsed = created.safeParse(answer);
    if (parsed.success) session.keyId = parsed.data.key.id;
  }
  const cliId = /^id:\s+(key_\w+)$/m.exec(run.stdout)?.[1];
  if (/\bkeygate keys create\b/.test(command) && cliId !== undefined) session.keyId = cliId;
}

/** A KeyAdmin answer (Connect JSON or gRPC through `buf curl`) checked against its request. */
const KEY_ADMIN_ANSWERS: Record<string, (answer: unknown, request: Record<string, unknown>) => void> = {
  UpsertAccount: (answer, request) => expect(answer).toMatchObject({ account: { ownerId: request["ownerId"], plan: request["plan"] } }),
  CreateKey: (answer, request) =>
    expect(answer).toMatchObject({
      key: { id: expect.stringMatching(KEY_ID), ownerId: request["ownerId"], name: request["name"], state: "active", ...(request["scopes"] === undefined ? {} : { scopes: request["scopes"] }) },
      secret: expect.stringMatching(SECRET),
    }),
  ListKeys: (answer, request) => {
    const keys = z.object({ keys: z.array(z.object({ id: z.string(), ownerId: z.string() })) }).parse(answer).keys;
    expect(keys.length).toBeGreaterThan(0);
    for (const key of keys) expect(key.ownerId).toBe(request["ownerId"]);
  },
  UpdateKey: (answer, request) => expect(answer).toMatchObject({ key: { id: request["id"], name: request["name"] } }),
  RotateKey: (answer, request) =>
    expect(answer).toMatchObject({
      key: { id: expect.stringMatching(KEY_ID), state: "active" },
      secret: expect.stringMatching(SECRET),
      previous: { id: request["id"], state: Number(request["graceDays"]) > 0 ? "grace" : "revoked" },
    }),
  RevokeKey: (answer, request) => expect(answer).toMatchObject({ key: { id: request["id"], state: "revoked" } }),
  VerifyKey: (answer) => expect(answer).toMatchObject({ valid: true, code: "OK" }),
  AddCredits: (answer, request) => {
    const topup = z.object({ account: z.object({ ownerId: z.string(), topupCredits: z.string() }) }).parse(answer).account;
    expect(topup.ownerId).toBe(request["ownerId"]);
    expect(BigInt(topup.topupCredits)).toBeGreaterThanOrEqual(BigInt(String(request["amount"])));
  },
  GetUsage: (answer) => expect(answer).toHaveProperty("totals"),
  // envoy.service.auth.v3.Authorization/Check: allowed, with no error status.
  Check: (answer) => {
    expect(answer).toHaveProperty("okResponse");
    expect(answer).not.toHaveProperty("deniedResponse");
    expect(answer).not.toHaveProperty("status.code");
  },
};

function checkKeyAdmin(method: string, answer: unknown, command: string): void {
  const check = KEY_ADMIN_ANSWERS[method];
  if (check === undefined) throw new Error(`no expectation for the KeyAdmin method ${method}; add one to KEY_ADMIN_ANSWERS`);
  check(answer, requestOf(command));
}

function option(command: string, name: string): string | undefined {
  return new RegExp(`${name} ("[^"]*"|\\S+)`).exec(command)?.[1]?.replace(/^"|"$/g, "");
}

/** Human output of `npx keygate <subcommand>`, checked against the command's own arguments. */
const CLI_ANSWERS: Record<string, (run: Run, command: string) => void> = {
  "accounts set": (run, command) => expect(run.stdout).toMatch(new RegExp(`^plan:\\s+${option(command, "--plan")}$`, "m")),
  "keys create": (run, command) => {
    const target = /> (\S+)/.exec(command)?.[1];
    const printed = target === undefined ? run.stdout : readFileSync(join(session.cwd, target), "utf8");
    if (command.includes("--quiet")) expect(printed).toMatch(new RegExp(`^${SECRET.source}\\n$`));
    else {
      expect(printed).toMatch(new RegExp(`^secret:\\s+${SECRET.source}$`, "m"));
      expect(printed).toMatch(new RegExp(`^name:\\s+${option(command, "--name")}$`, "m"));
    }
    expect(run.stderr).toMatch(/shown only once/);
  },
  "keys list": (run) => {
    expect(run.stdout).toMatch(/^ID\s+NAME\s+MODE\s+STATE/);
    expect(run.stdout).toContain(session.keyId ?? "no key id");
  },
  "keys rotate": (run, command) => {
    expect(run.stdout).toMatch(new RegExp(`^secret:\\s+${SECRET.source}$`, "m"));
    expect(run.stdout).toMatch(new RegExp(`^previous state:\\s+${Number(option(command, "--grace-days")) > 0 ? "grace" : "revoked"}$`, "m"));
  },
  "keys verify": (run) => expect(run.stdout).toMatch(/^valid:\s+yes$/m),
  "keys disable": (run) => expect(run.stdout).toMatch(/^state:\s+disabled$/m),
  // The README rotates this key first, so once enabled it is back in its grace period.
  "keys enable": (run) => expect(run.stdout).toMatch(/^state:\s+grace$/m),
  "keys revoke": (run) => expect(run.stdout).toMatch(/^state:\s+revoked$/m),
  "accounts add-credits": (run, command) => {
    const amount = /add-credits \S+ (\d+)/.exec(command)?.[1] ?? "";
    const topup = /top-up (\d+)/.exec(run.stdout)?.[1] ?? "";
    expect(BigInt(topup)).toBeGreaterThanOrEqual(BigInt(amount));
  },
  usage: (run) => {
    expect(run.stdout).toMatch(/^allowed:\s+\d+$/m);
    expect(run.stdout).toMatch(/^credits used:\s+\d+$/m);
  },
  audit: (run, command) => {
    expect(command).toContain("--json");
    const { events } = z.object({ events: z.array(z.object({ action: z.string(), ownerId: z.string() })) }).parse(jsonOf(run.stdout));
    expect(events.map((e) => e.action)).toContain("key.create");
    for (const event of events) expect(event.ownerId).toBe(option(command, "--owner"));
  },
  // The running keygate migrated its database on start, so there is nothing left to do.
  migrate: (run, command) => {
    expect(command).toContain("--dry-run");
    expect(run.stdout).toMatch(/^SQLite \(.*keygate\.db\): up to date, nothing to do\n$/);
  },
};

/** Fails unless `run` is the answer the README promises for `command`. */
function expectAnswer(command: string, run: Run): void {
  const context = `${command}\nexit ${run.code}\nstdout: ${run.stdout}\nstderr: ${run.stderr}`;
  expect(run.code, context).toBe(0);
  const cli = /\bnpx keygate ((?:keys|accounts) [\w-]+|[\w-]+)/.exec(command)?.[1];
  if (cli !== undefined) {
    const check = CLI_ANSWERS[cli];
    if (check === undefined) throw new Error(`no expectation for \`keygate ${cli}\`; add one to CLI_ANSWERS`);
    check(run, command);
    return;
  }
  const method = /\/([A-Z]\w+)$/.exec(command)?.[1];
  if (command.startsWith("npx buf curl ") && method !== undefined) return checkKeyAdmin(method, jsonOf(run.stdout), command);
  if (command.startsWith("curl ")) {
    const answer = curlAnswer(run.stdout);
    expect(answer.status, context).toBe(200);
    if (method !== undefined) return checkKeyAdmin(method, jsonOf(answer.body), command);
    if (command.includes(`:${session.ports.http}/check`)) {
      // The HTTP mode allows with the identity headers for the upstream.
      expect(answer.headers).toMatch(/^x-keygate-owner-id: \S+\r?$/im);
      return;
    }
  }
  throw new Error(`no expectation for this README command; add one: ${command}`);
}

// ---- the tests -----------------------------------------------------------------------------------

const ASSIGNMENT = /^(?:export\s+)?[A-Za-z_]\w*=/;

function assignedNames(line: string): string[] {
  return [...line.matchAll(/(?:^|\s)(?:export\s+)?([A-Za-z_]\w*)=/g)].map((m) => m[1] ?? "");
}

function externalTool(command: string): string | undefined {
  const first = command.replace(/^(?:\w+=\S*\s+)*/, "").split(/\s+/)[0] ?? "";
  return EXTERNAL_TOOLS.find((tool) => tool === first || (first === "npx" && command.split(/\s+/)[1] === tool));
}

const packageJson = z.object({ scripts: z.object({ start: z.string(), prestart: z.string() }) });

describe("README commands, run as written against a real keygate: happy", { timeout: 90_000 }, () => {
  it("the README has the sections, each with ```sh commands", () => {
    for (const title of SECTIONS) expect(bySection.get(title)?.flat().length ?? 0, title).toBeGreaterThan(0);
  });

  it("the Quick start's port table is keygate's default ports, which the commands below are rewritten from", () => {
    const defaults = loadConfig({});
    expect(readmePorts()).toEqual({ grpc: defaults.grpcPort, http: defaults.httpAuthzPort, admin: defaults.adminPort });
  });

  for (const title of SECTIONS) {
    for (const [block, commands] of (bySection.get(title) ?? []).entries()) {
      for (const command of commands) {
        const name = `${title}, block ${block + 1}: ${command}`;
        const tool = externalTool(command);
        if (tool !== undefined) {
          it.skip(`${name} (needs ${tool})`, () => undefined);
        } else if (command === "npm install && npm start") {
          it(`${name} (run as \`npm start\` runs it, already installed)`, () => {
            const { scripts } = packageJson.parse(JSON.parse(readFileSync(join(root, "package.json"), "utf8")));
            expect(scripts.start).toBe(["node", ...KEYGATE_NODE_FLAGS, "dist/cli.js", "serve"].join(" "));
            expect(scripts.prestart).toBe("npm run build");
            // What the Quick start says the first start does.
            const tokenFile = join(session.cwd, "data", "admin-token");
            expect(statSync(tokenFile).mode & 0o777).toBe(0o600);
            expect(statSync(join(session.cwd, "data", "pepper")).mode & 0o777).toBe(0o600);
            expect(statSync(join(session.cwd, "data", "keygate.db")).isFile()).toBe(true);
            const token = readFileSync(tokenFile, "utf8").trim();
            expect(serverOut.split(token).length - 1).toBe(1);
            expect(serverOut).toMatch(/^Use it: curl /m);
          });
        } else if (ASSIGNMENT.test(command)) {
          it(name, async () => {
            session.assignments.push(withBoundPorts(command));
            const names = assignedNames(command);
            const run = await runInSession(names.map((n) => `printf '%s=%s\\n' ${n} "\${${n}[*]}"`).join("\n"));
            expect(run.code, run.stderr).toBe(0);
            expect(run.stderr).toBe("");
            for (const n of names) expect(run.stdout, `${n} is set`).toMatch(new RegExp(`^${n}=\\S`, "m"));
          });
        } else {
          it(name, async () => {
            const filled = fill(withBoundPorts(command));
            const run = await runInSession(filled);
            remember(filled, run);
            expectAnswer(filled, run);
          });
        }
      }
    }
  }
});
