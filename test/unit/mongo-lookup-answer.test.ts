import { describe, expect, it } from "vitest";
import { StoreUnavailableError } from "../../src/store/errors.js";
import { firstBatch } from "../../src/store/mongo.js";

// The cold lookup's answer is checked document by document before any of it is used: a join that
// went wrong (a server bug, a hand-edited collection) must fail the lookup, never hand a Check
// another key's record or another account's plan.

const key = (hash: string, ownerId: string): Record<string, unknown> => ({ _id: `key-of-${hash}`, hash, owner_id: ownerId });
const account = (id: string): Record<string, unknown> => ({ _id: id, plan: "pro" });
const reply = (docs: unknown[]): Record<string, unknown> => ({ cursor: { id: 0, firstBatch: docs }, ok: 1 });

function refusal(docs: unknown[]): unknown {
  try {
    firstBatch(reply(docs));
  } catch (error) {
    return error;
  }
  return "accepted";
}

describe("the cold lookup's answer (firstBatch)", () => {
  it("accepts found keys with their owners' accounts, and hashes with nothing found", () => {
    const docs = [
      { hash: "h1", key: key("h1", "o1"), account: account("o1") },
      { hash: "h2" },
      { hash: "h3", key: key("h3", "gone") },
    ];
    expect(firstBatch(reply(docs))).toEqual(docs);
    expect(firstBatch(reply([]))).toEqual([]);
  });

  it.each([
    ["a key whose hash is not the one it answers", [{ hash: "h1", key: key("h2", "o1"), account: account("o1") }]],
    ["an account that is not the key's owner", [{ hash: "h1", key: key("h1", "o1"), account: account("o2") }]],
    ["an account without a key", [{ hash: "h1", account: account("o1") }]],
    ["a document without a hash", [{ key: key("h1", "o1"), account: account("o1") }]],
    ["a key that is not a document", [{ hash: "h1", key: "h1" }]],
    ["something other than a document", ["h1"]],
    ["a wrong document after a right one", [{ hash: "h1", key: key("h1", "o1"), account: account("o1") }, { hash: "h2", key: key("h1", "o1") }]],
  ])("refuses %s", (_, docs) => {
    const error = refusal(docs);
    expect(error).toBeInstanceOf(StoreUnavailableError);
    expect(error).toMatchObject({ message: "MongoDB answered the key lookup with something other than its documents" });
  });

  it("refuses a reply without a first batch", () => {
    expect(() => firstBatch({ ok: 1 })).toThrow(new StoreUnavailableError("MongoDB answered the key lookup without a first batch"));
  });
});
