import { createHash } from "node:crypto";
import { create, toBinary } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import type { Decision } from "../../src/authz/pipeline.js";
import { CheckRequestSchema } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { KeyFormat } from "../../src/keys/key-format.js";
import { collectingLogger, readyAuthzCore } from "../harness/authz-core.js";
import { checkInit } from "../harness/keygate.js";

// The ROUTE_MISCONFIGURED line shows a per-route setting of more than 64 characters by its
// length alone. A cut piece of it was shown before, redacted first: redaction shortens the text
// (a long key-shaped run becomes "[redacted]"), which pulled characters from past the cut into
// view, a key or hash cut short no longer had its shape, and a configured literal (the pepper, an
// admin token) split by the cut was no longer found whole by the log's scrubber.

const MSG = "bad per-route settings from the proxy";

/** Runs one ROUTE_MISCONFIGURED Check with these settings through the gRPC core; returns the log lines. */
async function logOf(extensions: Record<string, string>, secrets: readonly string[] = []): Promise<string[]> {
  const { logger, lines } = collectingLogger(secrets);
  const denial: Decision = { allow: false, reason: "ROUTE_MISCONFIGURED", message: "bad per-route settings" };
  const { core } = readyAuthzCore({ decide: () => Promise.resolve(denial) }, logger);
  const bytes = toBinary(CheckRequestSchema, create(CheckRequestSchema, checkInit({ "x-request-id": "r1" }, "/v1/things", "GET", extensions)));
  await new Promise<void>((resolve) => core.check(core.decodeCheck(bytes), undefined, () => resolve()));
  // record() runs after the answer is handed over.
  await new Promise((resolve) => setImmediate(resolve));
  return lines.filter((line) => line.includes(MSG));
}

describe("ROUTE_MISCONFIGURED line: no piece of a secret in a long setting", () => {
  it("a 64-hex hash behind a long key-shaped run", async () => {
    const hash = createHash("sha256").update("a key").digest("hex");
    // 192 characters shaped as an API key (→ "[redacted]"), a separator, then the hash at 193..257.
    const shrink = `x_live_${"A".repeat(185)}`;
    const cost = `${shrink}-${hash}${"z".repeat(40)}`;
    expect(cost.indexOf(hash)).toBe(193);
    const lines = await logOf({ cost });
    expect(lines).toHaveLength(1);
    // No run of the hash's digits long enough to identify it.
    expect(lines[0]).not.toContain(hash.slice(0, 20));
  });

  it("an API key behind a long key-shaped run", async () => {
    const key = new KeyFormat("kg").generate("live");
    // "kg_live_" + 7 characters end at 256.
    const shrink = `x_live_${"A".repeat(233)}`;
    const cost = `${shrink}-${key}`;
    expect(cost.indexOf(key)).toBe(241);
    const lines = await logOf({ cost });
    expect(lines).toHaveLength(1);
    expect(lines[0]).not.toContain(key.slice(0, 15));
  });

  it("a configured secret literal (pepper, admin token) across character 64, which the logger knows only whole", async () => {
    // Not secret-shaped: only the logger's literal list (createLogger's `secrets`) redacts it.
    const pepper = "Pq7.Xz9.mR2.vL5.nK8.wT3.hJ6.cB4.yF1";
    const cost = `${"c".repeat(40)} ${pepper} ${"d".repeat(40)}`;
    const lines = await logOf({ cost }, [pepper]);
    expect(lines).toHaveLength(1);
    expect(lines[0]).not.toContain(pepper.slice(0, 16));
  });
});
