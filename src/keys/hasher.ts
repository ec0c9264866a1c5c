import { createHmac } from "node:crypto";

/** HMAC-SHA256 of a key under the pepper: the only form of a key that is stored. */
export class KeyHasher {
  readonly #pepper: Buffer;

  constructor(pepper: string) {
    this.#pepper = Buffer.from(pepper, "utf8");
  }

  /** Hex digest used as the lookup index. */
  hash(key: string): string {
    return createHmac("sha256", this.#pepper).update(key, "utf8").digest("hex");
  }
}
