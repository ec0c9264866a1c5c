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
 *
 * `--no-allocation-site-pretenuring` keeps V8 from allocating straight into the old generation
 * the objects of an array or object literal whose earlier objects survived. At start-up and on
 * cold lookups, a Check's objects outlive scavenges while it waits on the store, and V8 marks
 * their literals for the old generation for good; from then on every cached Check's objects go
 * there and die there, for a mark-compact to collect. Embedded hot, 20,000 keys, a fixed 3,000
 * Checks/s on one pinned core, two runs each (`--trace-gc-nvp`): the old generation grew 1.34 and
 * 1.50 MB/s against 2.16 and 2.27, so mark-compacts come about 1.6 times less often, for
 * scavenges of 0.78 and 0.79 ms on average against 0.67 and 0.70; CPU per Check the same
 * (`scripts/compare-builds.ts --base HEAD --head-node-flags --no-allocation-site-pretenuring`,
 * four rounds each: 1.008 with 20,000 keys under a closed loop, 1.006 on one key).
 */
export const KEYGATE_NODE_FLAGS: readonly string[] = ["--max-semi-space-size=8", "--no-parallel-scavenge", "--no-allocation-site-pretenuring"];
