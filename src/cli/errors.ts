import { Code } from "@connectrpc/connect";
import type { ConnectError } from "@connectrpc/connect";
import { printable } from "./format.js";

/** A failure the CLI reports as one line on stderr before exiting with `exitCode`. */
export class CliFailure extends Error {
  override readonly name = "CliFailure";
  constructor(
    message: string,
    readonly exitCode: number,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/** The snake_case name gRPC and Connect give a code on the wire, e.g. `invalid_argument`. */
export function codeName(code: Code): string {
  return Code[code].replace(/[A-Z]/g, (letter, offset: number) => (offset === 0 ? "" : "_") + letter.toLowerCase());
}

/** What the operator can do about each code; the server's message already names the field or record. */
function hint(code: Code, url: string): string | null {
  switch (code) {
    case Code.Unauthenticated:
      return "set --token or KEYGATE_ADMIN_TOKEN to an admin token";
    case Code.PermissionDenied:
      // An API key is refused as unauthenticated: this is a named token without the permission or owner.
      return "use an admin token that has that permission (and, for a token limited to owners, that owner)";
    case Code.Unavailable:
    case Code.Unknown:
      return `is keygate running at ${url}? (set --url or KEYGATE_URL)`;
    case Code.DeadlineExceeded:
      return `keygate at ${url} did not answer in time; retry`;
    case Code.Unimplemented:
      return `is ${url} keygate's admin port? (set --url or KEYGATE_URL)`;
    case Code.InvalidArgument:
      return "fix that value; --help lists the options";
    case Code.NotFound:
      return "check the id or owner (keygate keys list --owner <id>)";
    case Code.FailedPrecondition:
      return "check the key's state with keygate keys get <id>";
    case Code.ResourceExhausted:
      return "wait and retry, or raise the plan (keygate accounts set <owner> --plan <plan>)";
    case Code.Internal:
      return "see keygate's log";
    default:
      return null;
  }
}

/** Turns an error from a KeyAdmin call into the one line the CLI prints, exiting 1. */
export function serverFailure(error: ConnectError, url: string): CliFailure {
  const advice = hint(error.code, url);
  // A message may quote a refused value back (echo), control characters included.
  const message = printable(error.rawMessage.replace(/\s+/g, " ").trim());
  return new CliFailure(`${codeName(error.code)}: ${message}${advice === null ? "" : `; ${advice}`}`, 1, { cause: error });
}
