import type { DescMessage, MessageShape } from "@bufbuild/protobuf";
import type { Command } from "commander";
import type { CliContext } from "./context.js";
import { CliFailure } from "./errors.js";
import { writeStdout } from "./stdout.js";
import type { Pair } from "./views.js";

/** How `keys create` and `keys rotate` print the secret they receive. */
export interface IssuedSecret<Desc extends DescMessage> {
  schema: Desc;
  response: MessageShape<Desc>;
  secret: string;
  keyId: string;
  /** The text for a person to read, given the secret's line to place in it. */
  human: (secretLine: Pair) => string;
}

/**
 * Prints a newly issued secret exactly once. `--json`: the response on stdout (its `secret` field
 * carries it). `--quiet`: the secret alone on stdout, so it pipes into a secret store. Otherwise
 * the details, then the secret on its own line. The warning goes to stderr, without it, once the
 * secret is written; when stdout cannot take it (the reader has gone), a failure saying the key
 * is unusable and how to revoke it instead.
 */
export async function printIssuedSecret<Desc extends DescMessage>(context: CliContext, quiet: boolean, issued: IssuedSecret<Desc>): Promise<void> {
  const text = quiet ? `${issued.secret}\n` : context.render(issued.schema, issued.response, () => issued.human(["secret", issued.secret]));
  try {
    await writeStdout(text);
  } catch (error) {
    const id = issued.keyId;
    throw new CliFailure(`the secret of ${id} could not be written to stdout and cannot be shown again; revoke it: keygate keys revoke ${id}`, 1, { cause: error });
  }
  process.stderr.write(`keygate: store the secret of ${issued.keyId} now: it is shown only once and cannot be retrieved again\n`);
}

/** Refuses `--quiet` with `--json`: each means a different thing on stdout. */
export function checkQuiet(command: Command, context: CliContext, quiet: boolean): void {
  if (quiet && context.json) command.error("--quiet and --json cannot be used together: --quiet prints only the secret, --json the whole response");
}
