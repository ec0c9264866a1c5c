import { shellQuote } from "./admin-curl.js";

/** Text shown for a value that is not set. */
export const NONE = "-";

// Values come from the server, and older versions stored names and reasons as sent: a control or
// format character (newline, ESC, bidi override, zero-width space) or a line separator would
// forge a line, run a terminal escape or hide text, so each is printed as an escape instead.
const UNPRINTABLE = /[\p{Cc}\p{Zl}\p{Zp}]|(?![\u200C\u200D\u{E0020}-\u{E007F}])\p{Cf}/gu;
const SHORT_ESCAPES: ReadonlyMap<string, string> = new Map([
  ["\n", "\\n"],
  ["\r", "\\r"],
  ["\t", "\\t"],
]);

/** `text` with each control or format character spelled as an escape (`\n`, `\u{1b}`, `\u{202e}`), so it prints as one inert line. */
export function printable(text: string): string {
  return text.replace(UNPRINTABLE, (char) => SHORT_ESCAPES.get(char) ?? `\\u{${(char.codePointAt(0) ?? 0).toString(16)}}`);
}

/** `text` as one POSIX shell word in a command the CLI suggests: as it is when that is safe, else in single quotes. */
export function shellWord(text: string): string {
  return /^[\w.:@%+=,/-]+$/.test(text) ? text : shellQuote(text);
}

function pad(cells: readonly string[], widths: readonly number[]): string {
  // The last column is not padded, so lines carry no trailing spaces.
  return cells.map((cell, i) => (i === cells.length - 1 ? cell : cell.padEnd(widths[i] ?? 0))).join("  ");
}

/** Aligns rows under a header, columns two spaces apart; one line each, ending in a newline. */
export function table(header: readonly string[], rows: ReadonlyArray<readonly string[]>): string {
  const cells = rows.map((row) => row.map(printable));
  const widths = header.map((title, i) => Math.max(title.length, ...cells.map((row) => (row[i] ?? "").length)));
  return [header, ...cells].map((row) => pad(row, widths)).join("\n") + "\n";
}

/** Label and value pairs, one a line, with the values aligned. */
export function details(pairs: ReadonlyArray<readonly [string, string]>): string {
  const width = Math.max(0, ...pairs.map(([label]) => label.length));
  return pairs.map(([label, value]) => `${`${label}:`.padEnd(width + 1)}  ${printable(value)}`).join("\n") + "\n";
}

/** A list as comma-separated text, or NONE when it is empty. */
export function list(items: readonly string[]): string {
  return items.length === 0 ? NONE : items.join(",");
}
