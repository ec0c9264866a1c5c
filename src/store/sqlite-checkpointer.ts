/**
 * The thread that checkpoints keygate's SQLite write-ahead log, so that the event loop never
 * waits for it. A checkpoint copies the log's pages into the database file and syncs it: with
 * write-behind flushes of tens of thousands of rows it held the event loop for 10–60 ms at a time
 * when it ran on the writing connection (SQLite's automatic checkpoint), stalling every Check
 * behind it. Started by SqliteKeyStore (checkpointInBackground); only node: modules, so that it
 * runs as it is from src/ and from dist/.
 */
import { DatabaseSync } from "node:sqlite";
import { parentPort, workerData } from "node:worker_threads";

/** What SqliteKeyStore gives the thread. */
export interface CheckpointerData {
  /** Marks the thread's data: the module is also loaded (for its constants) in other threads, where it does nothing. */
  role: typeof CHECKPOINTER_ROLE;
  path: string;
  intervalMs: number;
  busyTimeoutMs: number;
}

export const CHECKPOINTER_ROLE = "keygate-sqlite-checkpointer";

/** The message that stops the thread: it closes its connection and ends. */
export const STOP_CHECKPOINTER = "stop";

function dataOf(value: unknown): CheckpointerData | null {
  if (typeof value !== "object" || value === null || Reflect.get(value, "role") !== CHECKPOINTER_ROLE) return null;
  const path: unknown = Reflect.get(value, "path");
  const intervalMs: unknown = Reflect.get(value, "intervalMs");
  const busyTimeoutMs: unknown = Reflect.get(value, "busyTimeoutMs");
  if (typeof path !== "string" || typeof intervalMs !== "number" || typeof busyTimeoutMs !== "number") throw new Error("checkpointer: bad worker data");
  return { role: CHECKPOINTER_ROLE, path, intervalMs, busyTimeoutMs };
}

function run(port: NonNullable<typeof parentPort>, data: CheckpointerData): void {
  const db = new DatabaseSync(data.path, { timeout: data.busyTimeoutMs });
  // PASSIVE copies what it can without waiting for, or blocking, the writing connection.
  const checkpoint = (): void => {
    try {
      db.exec("PRAGMA wal_checkpoint(PASSIVE)");
    } catch (error) {
      port.postMessage({ error: error instanceof Error ? error.message : String(error) });
    }
  };
  const timer = setInterval(checkpoint, data.intervalMs);
  port.on("message", (message: unknown) => {
    if (message !== STOP_CHECKPOINTER) return;
    clearInterval(timer);
    db.close();
    port.close();
  });
}

const data = parentPort === null ? null : dataOf(workerData);
if (parentPort !== null && data !== null) run(parentPort, data);
