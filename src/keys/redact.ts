/** Log paths whose values are secrets: pino replaces them with "[redacted]". */
export const REDACTED_LOG_PATHS = [
  "secret",
  "*.secret",
  "key",
  "pepper",
  "hash",
  "*.hash",
  "token",
  "adminToken",
  "headers.authorization",
  "headers['x-api-key']",
  "headers.cookie",
  "req.headers.authorization",
  "req.headers['x-api-key']",
  "req.headers.cookie",
];

/** A key's display form: "kg_live_AbC1…wxyz". Never the whole key. */
export function previewKey(start: string, last4: string): string {
  return `${start}…${last4}`;
}
