/**
 * The node flags keygate is launched with (`npm start`, the image's CMD; a test keeps them
 * equal, and the bench starts keygate with them).
 *
 * `--max-semi-space-size=8` caps V8's young generation at 8 MiB a semi-space. On a machine with
 * gigabytes of memory V8 grows it to 32 MiB or more, and each scavenge then copies a few MiB of
 * survivors (node:http2's per-stream objects among them) in one pause: at 3,000 Checks/s on one
 * core, scavenges took 11–13 ms on average with the default and 1.1–1.9 ms with 8 MiB, with no
 * more GC time in total, and the young generation no longer holds ~100 MB resident.
 *
 * `--no-parallel-scavenge` does each young-generation GC on the event loop's thread alone. Its
 * helpers run V8's worker threads, which keygate sets to nice 19 (KEYGATE_GC_THREAD_NICE): on a
 * core they share with the event loop they add hand-offs and no speed. Embedded hot, 100,000
 * keys, on one pinned core, six runs each: scavenges took 0.77 to 1.02 ms on average against
 * 0.87 to 1.20 ms with the helpers (3.79 ms in a run that promoted 1.2 MB a scavenge), and p99 at
 * 3,000 Checks/s was 0.87 to 1.20 ms against 1.11 to 14.3 ms.
 */
export const KEYGATE_NODE_FLAGS: readonly string[] = ["--max-semi-space-size=8", "--no-parallel-scavenge"];
