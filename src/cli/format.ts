/** Text shown for a value that is not set. */
export const NONE = "-";

function pad(cells: readonly string[], widths: readonly number[]): string {
  // The last column is not padded, so lines carry no trailing spaces.
  return cells.map((cell, i) => (i === cells.length - 1 ? cell : cell.padEnd(widths[i] ?? 0))).join("  ");
}

/** Aligns rows under a header, columns two spaces apart; one line each, ending in a newline. */
export function table(header: readonly string[], rows: ReadonlyArray<readonly string[]>): string {
  const widths = header.map((title, i) => Math.max(title.length, ...rows.map((row) => (row[i] ?? "").length)));
  return [header, ...rows].map((row) => pad(row, widths)).join("\n") + "\n";
}

/** Label and value pairs, one a line, with the values aligned. */
export function details(pairs: ReadonlyArray<readonly [string, string]>): string {
  const width = Math.max(0, ...pairs.map(([label]) => label.length));
  return pairs.map(([label, value]) => `${`${label}:`.padEnd(width + 1)}  ${value}`).join("\n") + "\n";
}

/** A list as comma-separated text, or NONE when it is empty. */
export function list(items: readonly string[]): string {
  return items.length === 0 ? NONE : items.join(",");
}
