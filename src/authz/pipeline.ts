import type { SnapshotLookup } from "../cache/lookup.js";
import type { KeyFormat } from "../keys/key-format.js";
import type { KeyHasher } from "../keys/hasher.js";
import type { LastUsedRecorder } from "../store/last-used.js";
import { keyState } from "../store/store.js";
import type { KeySnapshot } from "../store/store.js";
import { extractCredential } from "./credential.js";
import type { HeaderBag } from "./credential.js";
import { DENIALS } from "./reasons.js";
import type { DenyReason } from "./reasons.js";
import type { RouteRequirements, RouteTable } from "./routes.js";

/** One request to decide, as both entry points present it. */
export interface CheckInput {
  method: string;
  path: string;
  headers: HeaderBag;
  /** Envoy's per-route context_extensions; undefined in the HTTP mode. */
  contextExtensions: Readonly<Record<string, string>> | undefined;
}

/** A granted request: who it is, and what the route asked for. */
export interface Allow {
  allow: true;
  snapshot: KeySnapshot;
  /** The header the key came in, to strip before the request goes upstream. */
  credentialHeader: string;
  route: RouteRequirements;
}

/** A refused request. Denials are data; failures are thrown. */
export interface Deny {
  allow: false;
  reason: DenyReason;
  message: string;
  /** Known when the key was found: lets VerifyKey say whose key it was. */
  snapshot?: KeySnapshot;
  retryAfterSeconds?: number;
}

/** The outcome of the pipeline. */
export type Decision = Allow | Deny;

/** Everything the pipeline reads. Tests pass real or in-memory parts. */
export interface PipelineDeps {
  format: KeyFormat;
  hasher: KeyHasher;
  lookup: SnapshotLookup;
  routes: RouteTable;
  credentialHeaders: readonly string[];
  lastUsed: LastUsedRecorder;
  nowMs: () => number;
}

// Denials that carry no per-request data are built once.
const FIXED: Readonly<Record<"MISSING_CREDENTIAL" | "MALFORMED_KEY" | "UNKNOWN_KEY", Deny>> = {
  MISSING_CREDENTIAL: { allow: false, reason: "MISSING_CREDENTIAL", message: DENIALS.MISSING_CREDENTIAL.message },
  MALFORMED_KEY: { allow: false, reason: "MALFORMED_KEY", message: DENIALS.MALFORMED_KEY.message },
  UNKNOWN_KEY: { allow: false, reason: "UNKNOWN_KEY", message: DENIALS.UNKNOWN_KEY.message },
};

function deny(reason: DenyReason, snapshot: KeySnapshot, message = DENIALS[reason].message): Deny {
  return { allow: false, reason, message, snapshot };
}

/**
 * The decision, in the order DESIGN.md fixes: credential, shape and checksum, lookup,
 * key state, project lock, subscription, scopes, then the rate and quota slots. The first
 * step that refuses ends it, so nothing is charged for a request that is refused anyway.
 */
export class DecisionPipeline {
  constructor(private readonly deps: PipelineDeps) {}

  /** Decides a proxied request. Synchronous when the key is in L1. */
  decide(input: CheckInput): Decision | Promise<Decision> {
    const credential = extractCredential(input.headers, this.deps.credentialHeaders);
    if (!credential.ok) return FIXED[credential.reason];
    if (this.deps.format.parse(credential.key) === null) return FIXED.MALFORMED_KEY;
    const route = this.deps.routes.requirements(input.method, input.path, input.contextExtensions);
    return this.#withSnapshot(credential.key, (snapshot) => this.#judge(snapshot, credential.header, route, true));
  }

  /** VerifyKey: the same steps for a bare key, with optional requirements, charging nothing. */
  async verify(key: string, route: RouteRequirements): Promise<Decision> {
    if (this.deps.format.parse(key) === null) return FIXED.MALFORMED_KEY;
    return this.#withSnapshot(key, (snapshot) => this.#judge(snapshot, "", route, false));
  }

  #withSnapshot(key: string, judge: (snapshot: KeySnapshot | null) => Decision): Decision | Promise<Decision> {
    const hash = this.deps.hasher.hash(key);
    const cached = this.deps.lookup.peek(hash);
    if (cached !== undefined) return judge(cached);
    return this.deps.lookup.load(hash).then(judge);
  }

  #judge(snapshot: KeySnapshot | null, credentialHeader: string, route: RouteRequirements, charge: boolean): Decision {
    if (snapshot === null) return FIXED.UNKNOWN_KEY;
    const { key, account } = snapshot;
    const nowMs = this.deps.nowMs();
    switch (keyState(key, nowMs)) {
      case "revoked":
        return deny("KEY_REVOKED", snapshot);
      case "rotated":
        return deny("KEY_ROTATED", snapshot);
      case "expired":
        return deny("KEY_EXPIRED", snapshot);
      case "active":
      case "grace":
        break;
    }
    if (route.projectId !== null && key.projectId !== null && key.projectId !== route.projectId) {
      return deny("PROJECT_MISMATCH", snapshot);
    }
    if (account.subscriptionStatus !== "active") return deny("PLAN_REQUIRED", snapshot);
    for (const scope of route.requiredScopes) {
      if (!key.scopes.includes(scope)) {
        return deny("MISSING_SCOPE", snapshot, `This API key does not have the "${scope}" scope.`);
      }
    }
    // Rate limit, then daily quota and credits, go here: after every step that can refuse for free.
    if (charge) this.deps.lastUsed.record(key.id, nowMs);
    return { allow: true, snapshot, credentialHeader, route };
  }
}
