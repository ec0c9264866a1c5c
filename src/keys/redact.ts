import { stdSerializers } from "pino";

/** What a redacted value becomes in a log line, so a reader sees that something was there. */
export const REDACTED = "[redacted]";

/**
 * Field names whose values are secrets, matched case-insensitively at any depth: a key, its hash,
 * the pepper, an admin token, and the headers that carry them.
 */
const SECRET_FIELDS = new Set([
  "secret",
  "key",
  "apikey",
  "api_key",
  "pepper",
  "hash",
  "token",
  "admintoken",
  "admintokens",
  "password",
  "authorization",
  "proxy-authorization",
  "x-api-key",
  "cookie",
  "set-cookie",
]);

/**
 * Secret shapes inside any string, such as an error message that quotes a value:
 * an API key (`<prefix>_live_…` or `<prefix>_test_…`, wherever it starts, its underscores
 * percent-encoded too, as a path may carry it), a generated admin token (`kgadm_…`), a
 * 64-hex-digit key hash, and the credential after an HTTP authentication scheme.
 */
const SECRET_IN_TEXT = /[A-Za-z0-9]{0,16}(?:_|%5[Ff])(?:live|test)(?:_|%5[Ff])[0-9A-Za-z]{8,}|\bkgadm_[A-Za-z0-9_-]{8,}|\b[0-9a-fA-F]{64}\b|\b(?:Bearer|Basic)\s+[^\s"',;]+/gi;
const AUTH_SCHEME = /^(Bearer|Basic)\s/i;

/** Deeper than this, a log value is replaced whole: keygate logs nothing nested this far. */
const MAX_DEPTH = 8;

/**
 * `text` with every secret-shaped run, and every literal in `secrets`, replaced by the marker. The
 * shapes are looked for in the text as given (a key holding a short password is still a key) and
 * with the literals blanked out (a hash, a token or a scheme right after a password still starts
 * a word);
 * where runs overlap they become one, replaced once: replaced one after the other, the first
 * marker would split the second match and leave the rest of a key or a password printed.
 */
export function redactText(text: string, secrets: readonly string[] = []): string {
  const runs: Run[] = [];
  for (const secret of secrets) {
    if (secret === "") continue;
    // Every occurrence, overlapping ones too ("abab" twice in "ababab").
    for (let at = text.indexOf(secret); at !== -1; at = text.indexOf(secret, at + 1)) runs.push({ start: at, end: at + secret.length, marker: REDACTED });
  }
  const literals = runs.length;
  addShapes(runs, text);
  if (literals > 0) {
    // Code units, as the indexes are: blank each literal's span with ";", which is no word
    // character (a shape after it starts a word) and ends a scheme's credential (a literal that
    // is the credential after "Bearer " does not make the next word one).
    const blanked = text.split("");
    for (const run of runs.slice(0, literals)) blanked.fill(";", run.start, run.end);
    addShapes(runs, blanked.join(""));
  }
  if (runs.length === 0) return text;
  // By start, the longer first: a run that starts inside the one before joins it, keeping its marker.
  runs.sort((a, b) => a.start - b.start || b.end - a.end);
  let out = "";
  let written = 0;
  let current = runs[0] as Run;
  for (const run of runs.slice(1)) {
    if (run.start < current.end) {
      current = { ...current, end: Math.max(current.end, run.end) };
      continue;
    }
    out += text.slice(written, current.start) + current.marker;
    written = current.end;
    current = run;
  }
  return out + text.slice(written, current.start) + current.marker + text.slice(current.end);
}

interface Run {
  start: number;
  end: number;
  marker: string;
}

/** The secret-shaped runs of `text`, an authentication scheme's kept before the marker. */
function addShapes(runs: Run[], text: string): void {
  for (const match of text.matchAll(SECRET_IN_TEXT)) {
    const scheme = AUTH_SCHEME.exec(match[0]);
    runs.push({ start: match.index, end: match.index + match[0].length, marker: scheme === null ? REDACTED : `${scheme[1] ?? ""} ${REDACTED}` });
  }
}

/**
 * A copy of a log object with secrets replaced by "[redacted]": fields named as secrets at any depth
 * (case-insensitive), and secret-shaped text or any of `secrets` inside every string, errors
 * included. The input is not changed.
 */
export function redactLogObject(value: unknown, secrets: readonly string[] = [], depth = 0): unknown {
  if (typeof value === "string") return redactText(value, secrets);
  if (value === null || typeof value !== "object") return value;
  if (depth >= MAX_DEPTH) return REDACTED;
  if (Array.isArray(value)) return value.map((item: unknown) => redactLogObject(item, secrets, depth + 1));
  if (value instanceof Date) return Number.isNaN(value.getTime()) ? "Invalid Date" : value.toISOString();
  // Raw bytes may be a key: their length is all a log line gets.
  if (ArrayBuffer.isView(value)) return `[${value.byteLength} bytes]`;
  // An error becomes pino's usual fields first: type, message and stack with causes, and its own fields.
  const fields: object = value instanceof Error ? stdSerializers.err(value) : value;
  const out: Record<string, unknown> = {};
  for (const [name, field] of Object.entries(fields)) {
    out[name] = SECRET_FIELDS.has(name.toLowerCase()) ? REDACTED : redactLogObject(field, secrets, depth + 1);
  }
  return out;
}
