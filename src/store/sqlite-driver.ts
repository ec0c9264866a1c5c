import type BetterSqlite3 from "better-sqlite3";

// better-sqlite3 up to 12 wraps its objects in V8's node::ObjectWrap. Built against Node 24.19+
// headers, its finalizer aborts the process when a Statement is garbage-collected outside a
// context. Release 13 uses Node-API and ships prebuilt binaries, but needs Node 22 or newer.
// So Node 24+ loads 13 (installed under the alias better-sqlite3-napi) and older Node loads 12.
const major = Number(process.versions.node.split(".")[0]);
const driver = major >= 24 ? await import("better-sqlite3-napi") : await import("better-sqlite3");

/** The better-sqlite3 Database constructor that is safe on this Node version. */
export const Database: typeof BetterSqlite3 = driver.default;
