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
 * helpers are V8's worker threads, which on a keygate held to one core share it with the event
 * loop: hand-offs and no speed. Embedded hot, 100,000 keys, one pinned core, three runs each in
 * turns: scavenges took 0.79 to 0.82 ms on average against 0.82 to 0.88 ms with the helpers, and
 * p99 at 3,000 Checks/s was 1.37 to 1.49 ms against 1.47 to 1.54 ms (with the worker threads at
 * nice 19, six runs each: 0.77 to 1.02 ms against 0.87 to 3.79 ms, and 0.87 to 1.20 ms against
 * 1.11 to 14.3 ms).
 */
export const KEYGATE_NODE_FLAGS: readonly string[] = ["--max-semi-space-size=8", "--no-parallel-scavenge"];
