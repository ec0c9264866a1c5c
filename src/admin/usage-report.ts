import { isAllowedOutcome } from "../store/store.js";
import type { UsageRow } from "../store/store.js";

/** Usage counts of one key and day, or of a whole range. */
export interface UsageCounts {
  allowed: number;
  denied: Record<string, number>;
  creditsUsed: number;
}

/** GetUsage: totals and the per-key, per-day breakdown. */
export interface UsageReport {
  totals: UsageCounts;
  byKey: Array<{ keyId: string; day: string; usage: UsageCounts }>;
  /** Each key's name now, by id; a key that no longer exists has none. */
  names: ReadonlyMap<string, string>;
}

function emptyCounts(): UsageCounts {
  return { allowed: 0, denied: {}, creditsUsed: 0 };
}

function addRow(counts: UsageCounts, row: UsageRow): void {
  if (isAllowedOutcome(row.outcome)) counts.allowed += row.count;
  else counts.denied[row.outcome] = (counts.denied[row.outcome] ?? 0) + row.count;
  counts.creditsUsed += row.credits;
}

/** Folds stored rows into totals and one entry per key and day. */
export function summarizeUsage(rows: readonly UsageRow[], names: ReadonlyMap<string, string> = new Map()): UsageReport {
  const totals = emptyCounts();
  const byKey = new Map<string, { keyId: string; day: string; usage: UsageCounts }>();
  for (const row of rows) {
    addRow(totals, row);
    const id = `${row.day}|${row.keyId}`;
    let entry = byKey.get(id);
    if (entry === undefined) {
      entry = { keyId: row.keyId, day: row.day, usage: emptyCounts() };
      byKey.set(id, entry);
    }
    addRow(entry.usage, row);
  }
  return { totals, byKey: [...byKey.values()], names };
}
