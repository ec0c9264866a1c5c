import { InvalidArgumentError } from "commander";
import { describe, expect, it } from "vitest";
import { instant, timeoutSeconds } from "../../src/cli/parsers.js";

// `--expires` and `--since` take an RFC 3339 instant and send exactly the instant the text spells:
// a day, hour or offset that does not exist is refused (exit 2), never rolled over into another
// (Date.parse reads 2027-02-29 as 1 March, and `1/2/2030` as local time).

/** The instant `instant()` sends for `value`, as ISO 8601 UTC with nanoseconds. */
function sent(value: string): string {
  const timestamp = instant(value);
  const iso = new Date(Number(timestamp.seconds) * 1000).toISOString();
  return `${iso.slice(0, 19)}.${String(timestamp.nanos).padStart(9, "0")}Z`;
}

/** The message `instant()` refuses `value` with. */
function refusal(value: string): string {
  try {
    instant(value);
  } catch (error) {
    expect(error).toBeInstanceOf(InvalidArgumentError);
    return error instanceof Error ? error.message : String(error);
  }
  throw new Error(`${value} was accepted`);
}

const SHAPE = "must be an RFC 3339 time, YYYY-MM-DDThh:mm:ss (optional fraction) then Z or an offset such as +02:00, e.g. 2027-01-31T00:00:00Z";

describe("instant(): RFC 3339 times.happy", () => {
  it.each([
    ["2027-01-31T00:00:00Z", "2027-01-31T00:00:00.000000000Z"],
    ["2028-02-29T12:00:00Z", "2028-02-29T12:00:00.000000000Z"], // a leap day in a leap year
    ["2000-02-29T00:00:00Z", "2000-02-29T00:00:00.000000000Z"], // divisible by 400: a leap year
    ["2026-12-31T23:59:59Z", "2026-12-31T23:59:59.000000000Z"],
    ["2027-01-31T02:00:00+02:00", "2027-01-31T00:00:00.000000000Z"],
    ["2027-01-31T00:30:00-01:00", "2027-01-31T01:30:00.000000000Z"],
    ["2028-02-29T23:30:00-01:00", "2028-03-01T00:30:00.000000000Z"], // the offset, not the text, crosses the month
    ["2027-01-01T00:00:00+23:59", "2026-12-31T00:01:00.000000000Z"],
    ["2027-01-31T00:00:00.5Z", "2027-01-31T00:00:00.500000000Z"],
    ["2027-01-31T00:00:00.123456789Z", "2027-01-31T00:00:00.123456789Z"],
    ["2027-01-31T10:00:00.250+05:30", "2027-01-31T04:30:00.250000000Z"],
    ["2027-01-31t00:00:00z", "2027-01-31T00:00:00.000000000Z"], // RFC 3339 5.6: "t" and "z" may be lower case
    ["0050-06-01T00:00:00Z", "0050-06-01T00:00:00.000000000Z"], // a two-digit year is not read as 1950
    ["9999-12-31T23:59:59.999999999Z", "9999-12-31T23:59:59.999999999Z"],
  ])("%s is sent as %s", (value, expected) => {
    expect(sent(value)).toBe(expected);
  });
});

describe("instant(): times that name no instant.error", () => {
  it.each([
    ["2027-02-29T00:00:00Z", "there is no 2027-02-29: that month has 28 days"],
    ["2100-02-29T00:00:00Z", "there is no 2100-02-29: that month has 28 days"], // divisible by 100, not 400
    ["2027-04-31T00:00:00Z", "there is no 2027-04-31: that month has 30 days"],
    ["2027-01-00T00:00:00Z", "there is no 2027-01-00: that month has 31 days"],
    ["2027-13-01T00:00:00Z", "month 13 does not exist: months run 01-12"],
    ["2027-00-10T00:00:00Z", "month 00 does not exist: months run 01-12"],
    ["2027-01-31T24:00:00Z", "hour 24 does not exist: hours run 00-23 (24:00 is 00:00 of the next day)"],
    ["2027-01-31T10:60:00Z", "minute 60 does not exist: minutes run 00-59"],
    ["2026-12-31T23:59:60Z", "second 60 does not exist: seconds run 00-59 (leap seconds are not supported)"],
    ["2027-01-31T00:00:00+24:00", "offset +24:00 does not exist: offsets run -23:59 to +23:59"],
    ["2027-01-31T00:00:00-05:60", "offset -05:60 does not exist: offsets run -23:59 to +23:59"],
    ["2027-01-31T00:00:00.1234567891Z", "the fraction of a second has more than 9 digits (nanoseconds are the finest)"],
    ["0001-01-01T00:00:00+00:01", "must be from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z"],
    ["9999-12-31T23:59:59-00:01", "must be from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z"],
  ])("%s: %s", (value, message) => {
    expect(refusal(value)).toBe(message);
  });

  it.each([
    "1/2/2030", // Date.parse: 2 January 2030, local time
    "2030-01-02", // a day: Date.parse reads it as UTC midnight
    "2030-01-02T00:00:00", // no offset: Date.parse reads it as local time
    "2030-01-02 00:00:00Z",
    "2030-01-02T00:00Z",
    "2030-01-02T00:00:00.Z",
    "2030-01-02T00:00:00+0200",
    "2030-01-02T00:00:00+02",
    "+002030-01-02T00:00:00Z",
    "2030-1-2T00:00:00Z",
    "2030-01-02T00:00:00Z\n",
    " 2030-01-02T00:00:00Z",
    "2030-01-02T00:00:00GMT",
    "٢٠٣٠-01-02T00:00:00Z", // digits, but not ASCII ones
    "Wed, 02 Jan 2030 00:00:00 GMT",
    "",
  ])("%j is not RFC 3339", (value) => {
    expect(refusal(value)).toBe(SHAPE);
  });
});

describe("timeoutSeconds(), --call-timeout's parser.happy", () => {
  it("takes whole seconds from 1 to 3600", () => {
    expect([timeoutSeconds("1"), timeoutSeconds("30"), timeoutSeconds("3600")]).toEqual([1, 30, 3600]);
  });
});

describe("timeoutSeconds(), --call-timeout's parser.error", () => {
  it.each(["0", "3601", "1.5", "-1", "2s", ""])("refuses %j", (value) => {
    expect(() => timeoutSeconds(value)).toThrow("must be a whole number of seconds from 1 to 3600, e.g. 10");
  });
});
