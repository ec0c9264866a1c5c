import { create } from "@bufbuild/protobuf";
import { TimestampSchema } from "@bufbuild/protobuf/wkt";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { InvalidArgumentError } from "commander";

// Option parsers for commander: a value they refuse becomes a one-line usage error (exit 2).
// They check shape, that a time names the instant it spells, and the CLI's own timeout; ranges
// the server owns (grace 0-30, page size 1-100, credits 1-10⁹) are left to it, so the CLI never
// disagrees with the policy it talks to.

const DIGITS = /^\d+$/;
const DAY = /^\d{4}-\d{2}-\d{2}$/;
const INT32_MAX = 2 ** 31 - 1;
const INT64_MAX = 2n ** 63n - 1n;
// RFC 3339's date-time: YYYY-MM-DDThh:mm:ss, an optional fraction, then Z or ±hh:mm. Its fields
// sit at fixed offsets; "T" and "Z" may be lower case (RFC 3339 section 5.6).
const RFC3339 = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})$/i;
const DAYS_IN_MONTH = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
// The instants a Timestamp can carry in JSON, the wire the CLI speaks: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
const TIMESTAMP_MIN_SECONDS = -62_135_596_800;
const TIMESTAMP_MAX_SECONDS = 253_402_300_799;
const MAX_TIMEOUT_SECONDS = 3600;

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

function daysInMonth(year: number, month: number): number {
  const leap = year % 4 === 0 && (year % 100 !== 0 || year % 400 === 0);
  return month === 2 && leap ? 29 : (DAYS_IN_MONTH[month - 1] ?? 0);
}

/** The date and time of an RFC 3339 text, read at their fixed offsets. */
interface DateTimeFields {
  year: number;
  month: number;
  day: number;
  hour: number;
  minute: number;
  second: number;
}

function fieldsOf(value: string): DateTimeFields {
  const at = (from: number, length = 2): number => Number(value.slice(from, from + length));
  return { year: at(0, 4), month: at(5), day: at(8), hour: at(11), minute: at(14), second: at(17) };
}

/** What makes `fields` name no instant (2027-02-29, hour 24), or null when each is in range. */
function calendarProblem({ year, month, day, hour, minute, second }: DateTimeFields): string | null {
  const two = (n: number): string => String(n).padStart(2, "0");
  if (month < 1 || month > 12) return `month ${two(month)} does not exist: months run 01-12`;
  const days = daysInMonth(year, month);
  if (day < 1 || day > days) return `there is no ${String(year).padStart(4, "0")}-${two(month)}-${two(day)}: that month has ${days} days`;
  if (hour > 23) return `hour ${two(hour)} does not exist: hours run 00-23 (24:00 is 00:00 of the next day)`;
  if (minute > 59) return `minute ${two(minute)} does not exist: minutes run 00-59`;
  if (second > 59) return `second ${two(second)} does not exist: seconds run 00-59 (leap seconds are not supported)`;
  return null;
}

/** The offset `Z` or `±hh:mm` in minutes east of UTC, or null when it names no offset (+24:00). */
function offsetMinutes(offset: string): number | null {
  if (offset.toUpperCase() === "Z") return 0;
  const hours = Number(offset.slice(1, 3));
  const minutes = Number(offset.slice(4, 6));
  if (hours > 23 || minutes > 59) return null;
  return (offset.startsWith("-") ? -1 : 1) * (hours * 60 + minutes);
}

/**
 * An RFC 3339 instant, e.g. 2027-01-31T00:00:00Z or 2027-01-31T09:30:00.5+02:00, each field in
 * range as typed. Date.parse would roll 2027-02-29 over into March and read other text as local
 * time: the CLI would send an instant the operator never wrote.
 */
export function instant(value: string): Timestamp {
  const match = RFC3339.exec(value);
  if (match === null) throw new InvalidArgumentError("must be an RFC 3339 time, YYYY-MM-DDThh:mm:ss (optional fraction) then Z or an offset such as +02:00, e.g. 2027-01-31T00:00:00Z");
  const [, fraction = "", offset = "Z"] = match;
  const fields = fieldsOf(value);
  const problem = calendarProblem(fields);
  if (problem !== null) throw new InvalidArgumentError(problem);
  const east = offsetMinutes(offset);
  if (east === null) throw new InvalidArgumentError(`offset ${offset} does not exist: offsets run -23:59 to +23:59`);
  if (fraction.length > 9) throw new InvalidArgumentError("the fraction of a second has more than 9 digits (nanoseconds are the finest)");
  // setUTCFullYear, unlike Date.UTC, reads years 0-99 as written; minutes moved past 59 or below 0 by the offset carry over.
  const date = new Date(0);
  date.setUTCFullYear(fields.year, fields.month - 1, fields.day);
  date.setUTCHours(fields.hour, fields.minute - east, fields.second);
  const seconds = date.getTime() / 1000;
  if (seconds < TIMESTAMP_MIN_SECONDS || seconds > TIMESTAMP_MAX_SECONDS) throw new InvalidArgumentError("must be from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z");
  return create(TimestampSchema, { seconds: BigInt(seconds), nanos: Number(fraction.padEnd(9, "0")) });
}

/** How long to wait for keygate's answer: whole seconds, 1 to an hour. */
export function timeoutSeconds(value: string): number {
  if (!DIGITS.test(value) || Number(value) < 1 || Number(value) > MAX_TIMEOUT_SECONDS) {
    throw new InvalidArgumentError(`must be a whole number of seconds from 1 to ${MAX_TIMEOUT_SECONDS}, e.g. 10`);
  }
  return Number(value);
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
