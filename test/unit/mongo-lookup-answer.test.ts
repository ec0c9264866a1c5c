import mongoose from "mongoose";
import { describe, expect, it } from "vitest";
import { StoreUnavailableError } from "../../src/store/errors.js";
import { firstBatch, lookupAnswer } from "../../src/store/mongo.js";

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

// MongoDB ends a reply batch at 16 MiB and keeps a cursor for the rest: a reply with a cursor open
// is not the whole answer. It fails the lookup (a hash left out must never read as unknown), and
// the cursor is killed rather than left on the server until its idle timeout.
describe("the cold lookup's whole answer (lookupAnswer)", () => {
  const docs = [{ hash: "h1", key: key("h1", "o1"), account: account("o1") }, { hash: "h2" }];
  const withCursor = (id: unknown): Record<string, unknown> => ({ cursor: { id, ns: "keygate.lookup_anchor", firstBatch: docs }, ok: 1 });

  function answer(reply: Record<string, unknown>, run: (command: mongoose.mongo.Document) => Promise<unknown> = () => Promise.resolve({ ok: 1 })): { result: unknown; sent: mongoose.mongo.Document[] } {
    const sent: mongoose.mongo.Document[] = [];
    try {
      return {
        result: lookupAnswer(reply, (command) => {
          sent.push(command);
          return run(command);
        }),
        sent,
      };
    } catch (error) {
      return { result: error, sent };
    }
  }

  it.each([
    ["0", 0],
    ["a 64-bit 0", mongoose.mongo.Long.ZERO],
  ])("is the first batch when the reply's cursor id is %s, and sends nothing", (_, id) => {
    expect(answer(withCursor(id))).toEqual({ result: docs, sent: [] });
  });

  it.each([
    ["a number (the driver's reading of an id that fits a double)", 7, mongoose.mongo.Long.fromNumber(7)],
    ["a 64-bit integer", mongoose.mongo.Long.fromString("8646911284551352321"), mongoose.mongo.Long.fromString("8646911284551352321")],
  ])("fails the lookup and kills the cursor when the reply leaves one open, its id %s", (_, id, killed) => {
    const { result, sent } = answer(withCursor(id));
    expect(result).toBeInstanceOf(StoreUnavailableError);
    expect(result).toMatchObject({ message: "MongoDB answered the key lookup in more than one batch" });
    expect(sent).toEqual([{ killCursors: "lookup_anchor", cursors: [killed] }]);
    expect(mongoose.mongo.Long.isLong(sent[0]?.["cursors"]?.[0])).toBe(true);
  });

  it("fails the lookup the same way when the kill itself fails, leaving no rejection unhandled", async () => {
    let unhandled: unknown;
    const onUnhandled = (reason: unknown): void => {
      unhandled = reason;
    };
    process.on("unhandledRejection", onUnhandled);
    try {
      const { result, sent } = answer(withCursor(7), () => Promise.reject(new Error("connection closed")));
      expect(result).toMatchObject({ message: "MongoDB answered the key lookup in more than one batch" });
      expect(sent).toHaveLength(1);
      await new Promise((resolve) => setImmediate(resolve));
      expect(unhandled).toBeUndefined();
    } finally {
      process.off("unhandledRejection", onUnhandled);
    }
  });
});
