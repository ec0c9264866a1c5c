import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";

setFlagsFromString("--expose-gc");
/** V8's full collection, exposed in this process. */
export const gc = runInNewContext("gc") as () => void;

/** Heap still in use after a full GC, less what was in use before `run`, in MiB. */
export function retainedMiB(run: () => void): number {
  gc();
  const before = process.memoryUsage().heapUsed;
  run();
  gc();
  return (process.memoryUsage().heapUsed - before) / (1024 * 1024);
}
