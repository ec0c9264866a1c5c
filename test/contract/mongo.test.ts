import { describe, it } from "vitest";
import { MongoKeyStore } from "../../src/store/mongo.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";
import { runKeyStoreContract } from "./key-store.contract.js";

if (requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh or set KEYGATE_TEST_MONGODB_URI")) {
  let server: MongoWire | undefined;
  runKeyStoreContract("mongodb", async () => {
    server = await startMongoWire();
    const store = await MongoKeyStore.connect(server.uri);
    return {
      store,
      async close() {
        await store.close();
        await server?.stop();
      },
    };
  });
} else {
  describe.skip("KeyStore contract: mongodb", () => {
    it("needs a MongoDB-wire server", () => undefined);
  });
}
