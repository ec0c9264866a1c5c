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

/**
 * How the connection failed when the error is the client's own (Node's error is its cause), or
 * null when keygate answered. "never made": no request was sent (refused, no such host).
 */
function connectionFailure(error: ConnectError): "never made" | "broken" | null {
  for (let cause: unknown = error.cause, depth = 0; cause instanceof Error && depth < 8; cause = cause.cause, depth++) {
    if (!("code" in cause) || typeof cause.code !== "string") continue;
    // A host with several addresses that all failed (an IPv6 and an IPv4 localhost): Node's
    // AggregateError carries no syscall of its own; each attempt it holds does.
    const attempts = cause instanceof AggregateError ? (cause.errors as unknown[]) : [cause];
    return attempts.length > 0 && attempts.every(neverConnected) ? "never made" : "broken";
  }
  return null;
}

/** Whether a Node error is a connection that was never made (refused, unreachable, no such host). */
function neverConnected(error: unknown): boolean {
  const syscall = error instanceof Error && "syscall" in error ? error.syscall : undefined;
  return syscall === "connect" || syscall === "getaddrinfo";
}

/** `advice`, then what to check before retrying a write whose answer was lost (keygate may have done it). */
function withUnsafeRetry(advice: string, beforeRetry: string | null): string {
  return beforeRetry === null ? advice : `${advice}; ${beforeRetry}`;
}

/**
 * What the operator can do about a failed call; the server's message already names the field or
 * record. `beforeRetry` is set for a write a repeat would do twice (keys create): when the answer
 * is lost, keygate may have done it, so the advice says how to check instead of "retry".
 */
function hint(error: ConnectError, url: string, beforeRetry: string | null): string | null {
  const connection = connectionFailure(error);
  if (connection === "never made") return `is keygate running at ${url}? (set --url or KEYGATE_URL)`;
  // A reset, EPIPE or unparseable answer: most often --url names another port (the gRPC Check port), not keygate failing.
  if (connection === "broken") return withUnsafeRetry(`the connection to ${url} failed: is it keygate's admin port? (set --url or KEYGATE_URL)`, beforeRetry);
  switch (error.code) {
    case Code.Unauthenticated:
      return "set --token or KEYGATE_ADMIN_TOKEN to an admin token";
    case Code.PermissionDenied:
      // An API key is refused as unauthenticated: this is a named token without the permission or owner.
      return "use an admin token that has that permission (and, for a token limited to owners, that owner)";
    case Code.Unavailable:
    case Code.Unknown:
      return withUnsafeRetry(`is keygate running at ${url}? (set --url or KEYGATE_URL)`, beforeRetry);
    case Code.DeadlineExceeded:
      return `keygate at ${url} did not answer in time; ${beforeRetry ?? "retry"}`;
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

/**
 * Turns an error from a KeyAdmin call into the one line the CLI prints, exiting 1. `url` is as
 * printed (without a password); `beforeRetry` as hint() takes it.
 */
export function serverFailure(error: ConnectError, url: string, beforeRetry: string | null = null): CliFailure {
  const advice = hint(error, url, beforeRetry);
  const message = error.rawMessage.replace(/\s+/g, " ").trim();
  // A message may quote a refused value back (echo), and the advice an owner as typed, control characters included.
  return new CliFailure(printable(`${codeName(error.code)}: ${message}${advice === null ? "" : `; ${advice}`}`), 1, { cause: error });
}
