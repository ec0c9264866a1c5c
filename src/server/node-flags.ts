/**
 * The node flags keygate is launched with (`npm start`, the image's CMD; a test keeps them
 * equal, and the bench starts keygate with them).
 *
 * `--max-semi-space-size=8` caps V8's young generation at 8 MiB a semi-space. On a machine with
 * gigabytes of memory V8 grows it to 32 MiB or more, and each scavenge then copies a few MiB of
 * survivors (node:http2's per-stream objects among them) in one pause: at 3,000 Checks/s on one
 * core, scavenges took 11–13 ms on average with the default and 1.1–1.9 ms with 8 MiB, with no
 * more GC time in total, and the young generation no longer holds ~100 MB resident.
 */
export const KEYGATE_NODE_FLAGS: readonly string[] = ["--max-semi-space-size=8"];
