import { toJson } from "@bufbuild/protobuf";
import type { DescMessage, MessageShape } from "@bufbuild/protobuf";
import { ConnectError } from "@connectrpc/connect";
import type { Command } from "commander";
import { z } from "zod";
import { createAdminClient } from "./client.js";
import type { AdminClient } from "./client.js";
import { serverFailure } from "./errors.js";
import { shownUrl } from "./url.js";

/** What a KeyAdmin subcommand runs with: the client, where it points, and how to print. */
export interface CliContext {
  admin: AdminClient;
  /** keygate's admin URL as the CLI prints it: without the password it may hold. */
  url: string;
  json: boolean;
  /** A response as printed: proto JSON (as the KeyAdmin API sends it) with --json, else the human text. */
  render<Desc extends DescMessage>(schema: Desc, message: MessageShape<Desc>, human: () => string): string;
  /** Prints a response on stdout, as render() has it. */
  emit<Desc extends DescMessage>(schema: Desc, message: MessageShape<Desc>, human: () => string): void;
}

// Commander hands option values over as `any`; these schemas are where they become typed.
const globalOptions = z.object({ url: z.string(), token: z.string().optional(), json: z.boolean().optional(), callTimeout: z.number() });

/**
 * What in `token` an Authorization header cannot carry, or null when it can be sent. The token
 * itself goes into no message: Headers.set would quote the whole header in its TypeError.
 */
function unsendable(token: string): string | null {
  if (/[\r\n]/.test(token)) return "a line break";
  if (/[ \t]/.test(token)) return "a space or tab";
  if (/[\x00-\x1f\x7f]/.test(token)) return "a control character";
  if (/[^\x21-\x7e]/.test(token)) return "a character outside ASCII";
  return null;
}

function contextFor(command: Command): CliContext {
  const globals = globalOptions.parse(command.optsWithGlobals());
  let url: URL;
  try {
    url = new URL(globals.url);
  } catch {
    command.error(`--url must be an http(s) URL such as http://127.0.0.1:8080; got "${shownUrl(globals.url)}"`);
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") command.error(`--url must start with http:// or https://; got "${shownUrl(globals.url)}"`);
  if (globals.token === undefined || globals.token === "") command.error("no admin token: set --token or KEYGATE_ADMIN_TOKEN");
  const problem = unsendable(globals.token);
  if (problem !== null) {
    const source = command.getOptionValueSourceWithGlobals("token") === "env" ? "KEYGATE_ADMIN_TOKEN" : "--token";
    command.error(`${source} contains ${problem}, which an Authorization header cannot carry; an admin token is printable ASCII without spaces`);
  }
  const baseUrl = globals.url.replace(/\/+$/, "");
  const json = globals.json === true;
  const render: CliContext["render"] = (schema, message, human) => (json ? `${JSON.stringify(toJson(schema, message), null, 2)}\n` : human());
  return {
    admin: createAdminClient(baseUrl, globals.token, globals.callTimeout),
    url: shownUrl(baseUrl),
    json,
    render,
    emit(schema, message, human) {
      process.stdout.write(render(schema, message, human));
    },
  };
}

/** Commander's untyped positional arguments for `command`, checked against a zod schema. */
export function argsOf<S extends z.ZodType>(command: Command, schema: S): z.output<S> {
  return schema.parse(command.processedArgs);
}

/** Commander's untyped options for `command` (its own, not the global ones), checked against a zod schema. */
export function optionsOf<S extends z.ZodType>(command: Command, schema: S): z.output<S> {
  return schema.parse(command.opts());
}

/**
 * Sets `command`'s action to `run` with a KeyAdmin context; a server error becomes a one-line
 * failure (exit 1). `beforeRetry` is for a write that a repeat would do twice (keys create): what
 * to check before retrying when its answer is lost, as keygate may have done it; null when a
 * retry is safe after all (a top-up with an idempotency key).
 */
export function onRun(command: Command, run: (context: CliContext) => Promise<void>, beforeRetry?: () => string | null): Command {
  return command.action(async () => {
    const context = contextFor(command);
    try {
      await run(context);
    } catch (error) {
      if (error instanceof ConnectError) throw serverFailure(error, context.url, beforeRetry?.() ?? null);
      throw error;
    }
  });
}
