import { InvalidArgumentError } from "commander";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import type { Timestamp } from "@bufbuild/protobuf/wkt";

// Option parsers for commander: a value they refuse becomes a one-line usage error (exit 2).
// They check shape only; ranges the server owns (grace 0-30, page size 1-100, credits 1-10⁹)
// are left to it, so the CLI never disagrees with the policy it talks to.

const DIGITS = /^\d+$/;
const DAY = /^\d{4}-\d{2}-\d{2}$/;
const INT32_MAX = 2 ** 31 - 1;
const INT64_MAX = 2n ** 63n - 1n;

/** A whole number that fits the proto's int32. */
export function wholeNumber(value: string): number {
  if (!DIGITS.test(value) || Number(value) > INT32_MAX) throw new InvalidArgumentError("must be a whole number, e.g. 7");
  return Number(value);
}

/** A credit amount: a whole number that fits the proto's int64. */
export function credits(value: string): bigint {
  if (!DIGITS.test(value) || BigInt(value) > INT64_MAX) throw new InvalidArgumentError("must be a whole number of credits, e.g. 500");
  return BigInt(value);
}

/** `<limit>/<seconds>`, e.g. `100/60`: limit requests per window. */
export function rateLimit(value: string): { limit: number; windowSeconds: number } {
  const [limit, seconds, extra] = value.split("/");
  if (limit === undefined || seconds === undefined || extra !== undefined || !DIGITS.test(limit) || !DIGITS.test(seconds)) {
    throw new InvalidArgumentError('must be "<requests>/<seconds>", e.g. 100/60');
  }
  return { limit: wholeNumber(limit), windowSeconds: wholeNumber(seconds) };
}

/** An ISO 8601 instant, e.g. 2027-01-31T00:00:00Z. */
export function instant(value: string): Timestamp {
  const ms = Date.parse(value);
  if (Number.isNaN(ms)) throw new InvalidArgumentError("must be an ISO 8601 time, e.g. 2027-01-31T00:00:00Z");
  return timestampFromDate(new Date(ms));
}

/** A UTC day, `YYYY-MM-DD`; the server checks that it exists. */
export function day(value: string): string {
  if (!DAY.test(value)) throw new InvalidArgumentError("must be a day YYYY-MM-DD, e.g. 2026-11-01");
  return value;
}

/** Collects a repeatable option into a list. */
export function collect(value: string, previous: string[] | undefined): string[] {
  return [...(previous ?? []), value];
}

/** Collects repeatable `key=value` options into a map. */
export function collectPairs(value: string, previous: Record<string, string> | undefined): Record<string, string> {
  const at = value.indexOf("=");
  if (at <= 0) throw new InvalidArgumentError('must be "key=value", e.g. team=billing');
  return { ...previous, [value.slice(0, at)]: value.slice(at + 1) };
}
