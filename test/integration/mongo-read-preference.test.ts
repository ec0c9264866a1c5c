import mongoose from "mongoose";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ConfigError } from "../../src/config.js";
import { BackendUnansweredError, mongoStartError } from "../../src/server/startup-errors.js";
import { MongoKeyStore } from "../../src/store/mongo.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";

// keygate reads from the primary whatever KEYGATE_MONGODB_URI says. A URI with
// readPreference=secondary (or secondaryPreferred, nearest, primaryPreferred) would let the
// lookup that follows a revocation read a secondary that has not applied it yet, and cache the
// key, unrevoked, for the whole TTL. The driver takes an option passed to the client over the
// URI's (parseOptions puts the object's value first), so MongoKeyStore passes primary. The
// MongoDB-wire server is one standalone server, where the driver sends no read preference at
// all: the client's own setting is what is checked.

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh or set KEYGATE_TEST_MONGODB_URI");

/** The mongoose connections `open` made (mongoose.createConnection keeps each in mongoose.connections). */
async function connectionsMadeBy(open: () => Promise<unknown>): Promise<mongoose.Connection[]> {
  const before = new Set(mongoose.connections);
  await open();
  return mongoose.connections.filter((connection) => !before.has(connection));
}

describe.runIf(mongoReady)("MongoKeyStore reads from the primary, whatever the URI's readPreference", { timeout: 60_000 }, () => {
  let wire: MongoWire | undefined;
  let base = "";

  beforeAll(async () => {
    wire = await startMongoWire();
    base = `${wire.uri.replace(/\/[^/?]*(\?.*)?$/, "")}/keygate_read_preference`;
  }, 120_000);
  afterAll(async () => {
    await wire?.stop();
  });

  it.each(["secondary", "secondaryPreferred", "nearest", "primaryPreferred"])("readPreference=%s in the URI: the store's client reads from the primary", async (mode) => {
    const uri = `${base}?readPreference=${mode}`;
    // The URI alone asks for that mode: what keygate's option overrides.
    const plain = new mongoose.mongo.MongoClient(uri);
    expect(plain.readPreference.mode).toBe(mode);
    await plain.close();

    let store: MongoKeyStore | undefined;
    const made = await connectionsMadeBy(async () => {
      store = await MongoKeyStore.connect(uri);
    });
    try {
      expect(made.map((connection) => connection.getClient().readPreference.mode)).toEqual(["primary"]);
      // And it reads: a lookup of an unknown hash answers null.
      expect(await store?.findSnapshotByHash("no-such-hash")).toBeNull();
    } finally {
      await store?.close();
    }
  });

  it("keygate migrate --dry-run (pendingAt) reads from the primary too", async () => {
    const made = await connectionsMadeBy(() => MongoKeyStore.pendingAt(`${base}?readPreference=secondary`));
    expect(made.map((connection) => connection.getClient().readPreference.mode)).toEqual(["primary"]);
  });

  it("error: a URI asking for reads at most maxStalenessSeconds behind is refused at start, one line naming KEYGATE_MONGODB_URI, never the URI", async () => {
    const uri = `${base.replace("mongodb://", "mongodb://reader:uri-password-marker@")}?readPreference=secondaryPreferred&maxStalenessSeconds=120`;
    const error: unknown = await MongoKeyStore.connect(uri).then(
      async (store) => {
        await store.close();
        return null;
      },
      (e: unknown) => e,
    );
    expect(error instanceof Error ? error.message : "").toBe("Primary read preference cannot be combined with maxStalenessSeconds");
    expect(String(error instanceof Error ? error.stack : error)).not.toContain("uri-password-marker");
    // keygate serve's line (exit 2 at once: not a server that has yet to answer).
    const line = mongoStartError(error);
    expect(line).toBeInstanceOf(ConfigError);
    expect(line).not.toBeInstanceOf(BackendUnansweredError);
    expect(line.message).toBe("KEYGATE_MONGODB_URI: MongoDB could not be opened (Primary read preference cannot be combined with maxStalenessSeconds)");
  });
});
