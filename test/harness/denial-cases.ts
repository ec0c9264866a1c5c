import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { KeyFormat } from "../../src/keys/key-format.js";
import type { TestKeygate } from "./keygate.js";

/** What one entry point answered: the HTTP status (0 when it has none), code and message. */
export interface EntryAnswer {
  status: number;
  code: string;
  message: string;
}

/** A request to make: the key (or none), the path, and the equivalent VerifyKey requirements. */
export interface DenialRequest {
  key: string | null;
  path: string;
  requiredScopes: string[];
  projectId: string;
}

/** One row of the shared denial table. */
export interface DenialCase {
  name: string;
  status: 401 | 402 | 403;
  code: string;
  message: string;
  prepare(kg: TestKeygate, owner: string): Promise<DenialRequest>;
}

const plain = (key: string | null, path = "/v1/things"): DenialRequest => ({ key, path, requiredScopes: [], projectId: "" });

async function newKey(kg: TestKeygate, owner: string, extra: { scopes?: string[]; projectId?: string; expiresAtMs?: number } = {}): Promise<{ id: string; secret: string }> {
  await kg.admin.upsertAccount({ ownerId: owner, plan: "business" });
  const created = await kg.admin.createKey({
    ownerId: owner,
    name: "denial case",
    scopes: extra.scopes ?? [],
    projectId: extra.projectId ?? "",
    expiresAt: extra.expiresAtMs === undefined ? undefined : timestampFromMs(extra.expiresAtMs),
  });
  if (created.key === undefined) throw new Error("CreateKey returned no key");
  return { id: created.key.id, secret: created.secret };
}

/** The denial table every entry point (gRPC Check, HTTP mode, VerifyKey) must answer alike. */
export const DENIAL_CASES: DenialCase[] = [
  {
    name: "no key",
    status: 401,
    code: "UNAUTHENTICATED",
    message: "An API key is required",
    prepare: async () => plain(null),
  },
  {
    name: "malformed key (checksum off by one character)",
    status: 401,
    code: "UNAUTHENTICATED",
    message: "malformed",
    prepare: async (kg, owner) => {
      const { secret } = await newKey(kg, owner);
      const last = secret.at(-1) === "A" ? "B" : "A";
      return plain(secret.slice(0, -1) + last);
    },
  },
  {
    name: "unknown key (well-formed, never issued)",
    status: 401,
    code: "UNAUTHENTICATED",
    message: "Invalid or expired API key.",
    prepare: async () => plain(new KeyFormat("kg").generate("live")),
  },
  {
    name: "revoked key",
    status: 401,
    code: "KEY_REVOKED",
    message: "revoked",
    prepare: async (kg, owner) => {
      const { id, secret } = await newKey(kg, owner);
      await kg.admin.revokeKey({ id, reason: "test" });
      return plain(secret);
    },
  },
  {
    name: "expired key",
    status: 401,
    code: "KEY_EXPIRED",
    message: "expired",
    prepare: async (kg, owner) => {
      // The clock belongs to the instance, so the key is created already due to expire.
      const { secret } = await newKey(kg, owner, { expiresAtMs: kg.clock.now() + 60_000 });
      kg.clock.offsetMs += 120_000;
      return plain(secret);
    },
  },
  {
    name: "rotated key after its grace period",
    status: 401,
    code: "KEY_REVOKED",
    message: "rotated",
    prepare: async (kg, owner) => {
      const { id, secret } = await newKey(kg, owner);
      await kg.admin.rotateKey({ id, graceDays: 1 });
      kg.clock.advanceDays(2);
      return plain(secret);
    },
  },
  {
    name: "key locked to another project",
    status: 403,
    code: "FORBIDDEN",
    message: "locked to another project",
    prepare: async (kg, owner) => {
      const { secret } = await newKey(kg, owner, { projectId: "beta" });
      return { key: secret, path: "/v1/projects/alpha/jobs", requiredScopes: [], projectId: "alpha" };
    },
  },
  {
    name: "account without an active subscription",
    status: 402,
    code: "PLAN_REQUIRED",
    message: "no active subscription",
    prepare: async (kg, owner) => {
      const { secret } = await newKey(kg, owner);
      await kg.admin.upsertAccount({ ownerId: owner, subscriptionStatus: "past_due" });
      return plain(secret);
    },
  },
  {
    name: "key without the route's scope",
    status: 403,
    code: "FORBIDDEN",
    message: 'This API key does not have the "decks" scope.',
    prepare: async (kg, owner) => {
      const { secret } = await newKey(kg, owner, { scopes: ["tutor"] });
      return { key: secret, path: "/v1/decks/42", requiredScopes: ["decks"], projectId: "" };
    },
  },
];
