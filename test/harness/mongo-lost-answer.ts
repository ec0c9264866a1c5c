import mongoose from "mongoose";
import { vi } from "vitest";

/** A collection method whose next call can be made to lose its answer. */
export type LosableMethod = "updateOne" | "findOneAndUpdate" | "insertOne";

/**
 * The next `method` call on the model's collection is made by the server, then its answer is lost
 * (as when the connection drops after the write went out). Undone by vi.restoreAllMocks().
 */
export function loseNextAnswer(model: mongoose.Model<never> | { collection: unknown }, method: LosableMethod): void {
  const collection = model.collection as unknown as Record<LosableMethod, (...args: unknown[]) => Promise<unknown>>;
  const original = collection[method].bind(collection);
  vi.spyOn(collection, method).mockImplementationOnce(async (...args: unknown[]) => {
    await original(...args);
    throw new mongoose.mongo.MongoNetworkError("connection 7 to 127.0.0.1:27017 closed");
  });
}

/** The model named `modelName` on the first of `connections` that has it. */
export function modelOn(connections: readonly mongoose.Connection[], modelName: string): { collection: unknown } {
  const model = connections.find((c) => c.models[modelName] !== undefined)?.models[modelName];
  if (model === undefined) throw new Error(`model ${modelName} not found`);
  return model;
}
