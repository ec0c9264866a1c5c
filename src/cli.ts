#!/usr/bin/env node
import { readFileSync } from "node:fs";
import { Command, CommanderError, Option } from "commander";
import { DEFAULT_ADMIN_URL, DEFAULT_TIMEOUT_SECONDS } from "./cli/client.js";
import { registerAccounts } from "./cli/commands/accounts.js";
import { registerAudit } from "./cli/commands/audit.js";
import { registerIstio } from "./cli/commands/istio.js";
import { registerKeys } from "./cli/commands/keys.js";
import { registerUsage } from "./cli/commands/usage.js";
import { CliFailure } from "./cli/errors.js";
import { timeoutSeconds } from "./cli/parsers.js";
import { onStdoutError } from "./cli/stdout.js";
import { urlPasswords } from "./cli/url.js";

/** The version in keygate's package.json, two directories up from src/cli.ts and dist/cli.js alike. */
function packageVersion(): string {
  const manifest = JSON.parse(readFileSync(new URL("../package.json", import.meta.url), "utf8")) as { version?: unknown };
  return typeof manifest.version === "string" ? manifest.version : "unknown";
}

// Exit codes: 0 ok, 1 an error from keygate (or no keygate to talk to), 2 bad usage.
const EXIT_USAGE = 2;

// Settings made before .command() are inherited by every subcommand: usage errors throw (so they
// exit 2, not commander's 1) and every --help lists --url, --token and --json.
const program = new Command()
  .name("keygate")
  .description("API-key service: Envoy ext_authz Check and the KeyAdmin lifecycle API")
  .version(packageVersion(), "-V, --version", "print keygate's version")
  .exitOverride()
  .configureHelp({ showGlobalOptions: true })
  // The CLI is a KeyAdmin client, not the server: these two variables are its own and are not
  // part of the server's Config (src/config.ts), which only `serve` reads.
  .addOption(new Option("--url <url>", "keygate's admin (KeyAdmin) URL").env("KEYGATE_URL").default(DEFAULT_ADMIN_URL))
  .addOption(new Option("--token <token>", "an admin token; prefer the variable, which stays out of shell history").env("KEYGATE_ADMIN_TOKEN"))
  .option("--json", "print the KeyAdmin response as proto JSON (for scripts)")
  // Not --timeout: program options are read after the subcommand too, and istio mesh-config has its own --timeout.
  .addOption(new Option("--call-timeout <seconds>", "how long to wait for keygate's answer, 1-3600").argParser(timeoutSeconds).default(DEFAULT_TIMEOUT_SECONDS))
  .addHelpText("after", "\nExit codes: 0 ok; 1 keygate refused the call or could not be reached; 2 bad usage.");

const serveCommand = program
  .command("serve", { isDefault: true })
  .description("run the authz (gRPC and HTTP) and admin listeners")
  // As the default command, serve receives whatever word was not a command; it refuses it below
  // as an unknown command rather than as an argument serve never takes.
  .allowExcessArguments()
  .option("--no-migrate", "refuse to start if the store needs schema steps, instead of applying them (then run keygate migrate)")
  .action(async (options: { migrate: boolean }) => {
    const [unknown] = serveCommand.args;
    if (unknown !== undefined) program.error(`unknown command '${unknown}'`, { code: "commander.unknownCommand" });
    // V8's GC threads get their priority (KEYGATE_GC_THREAD_NICE) before the server's modules
    // load: set after them, the process settled in a state where each young-generation GC
    // promoted about 1.4 MB instead of 80 KB at 3,000 Checks/s on one key (docs/performance-log.md).
    const { gcThreadNiceFromEnv, lowerGcThreadPriority } = await import("./server/gc-threads.js");
    const gcThreads = lowerGcThreadPriority(gcThreadNiceFromEnv(process.env));
    // Loaded on demand, so client subcommands do not pay for the server's modules.
    const { serve } = await import("./cli/commands/serve.js");
    await serve({ migrate: options.migrate, gcThreads });
  });
program
  .command("migrate")
  .description("bring the store's schema (SQLite in KEYGATE_DATA_DIR, or KEYGATE_MONGODB_URI) up to this keygate's; serve does it on start")
  .option("--dry-run", "print the schema steps that would be applied, and change nothing")
  .action(async (options: { dryRun?: boolean }) => {
    const { migrate } = await import("./cli/commands/migrate.js");
    await migrate(options.dryRun === true);
  });
registerKeys(program);
registerAccounts(program);
registerUsage(program);
registerAudit(program);
registerIstio(program);

/** Commander's usage errors as one line that says where the usage is explained. */
function oneLineErrors(command: Command, path: string): void {
  command.configureOutput({
    outputError: (message, write) => write(`keygate: ${message.replace(/^error: /, "").trimEnd()} (see: ${path} --help)\n`),
  });
  for (const sub of command.commands) oneLineErrors(sub, `${path} ${sub.name()}`);
}
oneLineErrors(program, "keygate");

/**
 * The secrets the CLI was given (its admin token, a password in its URL, and serve's tokens and
 * pepper), each whole and as its visible runs, since an error may quote a token broken at a line
 * break; longest first.
 */
function givenSecrets(): string[] {
  const token: unknown = program.getOptionValue("token");
  const url: unknown = program.getOptionValue("url");
  const env = process.env;
  const given = [
    typeof token === "string" ? token : "",
    ...(typeof url === "string" ? urlPasswords(url) : []),
    env.KEYGATE_ADMIN_TOKEN ?? "",
    env.KEYGATE_PEPPER ?? "",
    ...(env.KEYGATE_ADMIN_TOKENS ?? "").split(","),
  ];
  const forms = given.flatMap((secret) => [secret.replace(/\s+/g, " ").trim(), ...secret.split(/[^\x21-\x7e]+/)]);
  return [...new Set(forms)].filter((form) => form !== "").sort((a, b) => b.length - a.length);
}

/** An error nothing else handled, as one line without the secrets the CLI was given. */
async function unexpectedLine(error: unknown): Promise<string> {
  // Loaded here only: it brings pino, which client subcommands otherwise never load.
  const { redactText } = await import("./keys/redact.js");
  const text = error instanceof Error ? `${error.name}: ${error.message}` : String(error);
  return redactText(text.replace(/\s+/g, " ").trim(), givenSecrets());
}

// A closed stdout (`keygate … | head -c0`) is one line and exit 1, not Node's stack trace.
process.stdout.on("error", onStdoutError);

try {
  await program.parseAsync(process.argv);
} catch (error) {
  if (error instanceof CommanderError) {
    // --help exits 0; everything else commander refuses (including a bare `keygate keys`) is usage.
    process.exitCode = error.exitCode === 0 ? 0 : EXIT_USAGE;
  } else if (error instanceof CliFailure) {
    process.stderr.write(`keygate: ${error.message}\n`);
    process.exitCode = error.exitCode;
  } else {
    // A defect: one line, not a stack trace, which can quote a secret (Headers.set quotes the
    // whole header it refuses, the admin token with it).
    process.stderr.write(`keygate: unexpected error: ${await unexpectedLine(error)}\n`);
    process.exitCode = 1;
  }
}
