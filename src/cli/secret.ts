import type { DescMessage, MessageShape } from "@bufbuild/protobuf";
import type { Command } from "commander";
import type { CliContext } from "./context.js";
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
 * the details, then the secret on its own line. The warning always goes to stderr, without it.
 */
export function printIssuedSecret<Desc extends DescMessage>(context: CliContext, quiet: boolean, issued: IssuedSecret<Desc>): void {
  if (quiet) process.stdout.write(`${issued.secret}\n`);
  else context.emit(issued.schema, issued.response, () => issued.human(["secret", issued.secret]));
  process.stderr.write(`keygate: store the secret of ${issued.keyId} now: it is shown only once and cannot be retrieved again\n`);
}

/** Refuses `--quiet` with `--json`: each means a different thing on stdout. */
export function checkQuiet(command: Command, context: CliContext, quiet: boolean): void {
  if (quiet && context.json) command.error("--quiet and --json cannot be used together: --quiet prints only the secret, --json the whole response");
}
