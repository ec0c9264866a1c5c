import { createHmac, createSecretKey } from "node:crypto";
import type { KeyObject } from "node:crypto";

/** HMAC-SHA256 of a key under the pepper: the only form of a key that is stored. */
export class KeyHasher {
  // A KeyObject made once: on Node 24, createHmac with a Buffer key builds a key object on every
  // call, about 17 µs of a Check's CPU; with a KeyObject an HMAC takes about 3 µs (`npm run bench`
  // profile, and a microbenchmark on one pinned core). The digest is the same.
  readonly #pepper: KeyObject;

  constructor(pepper: string) {
    this.#pepper = createSecretKey(Buffer.from(pepper, "utf8"));
  }

  /** Hex digest used as the lookup index. */
  hash(key: string): string {
    return createHmac("sha256", this.#pepper).update(key, "utf8").digest("hex");
  }
}
