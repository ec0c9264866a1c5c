import { isMap, isSeq, parseDocument, YAMLMap, YAMLSeq } from "yaml";
import type { Document } from "yaml";

/** Where keygate's Check listener is, as Istio's envoyExtAuthzGrpc provider names it. */
export interface KeygateProvider {
  /** The provider's name, which AuthorizationPolicies reference (`provider.name`). */
  name: string;
  /** keygate's gRPC Check Service, fully qualified. */
  service: string;
  port: number;
  /** Istio duration, e.g. "0.25s": keep it above keygate's Check budget. */
  timeout: string;
}

/** The provider deploy/istio/mesh-config.yaml registers. */
export const DEFAULT_PROVIDER: KeygateProvider = {
  name: "keygate",
  service: "keygate-authz.keygate.svc.cluster.local",
  port: 9191,
  timeout: "0.25s",
};

/** What a merge input is: the `mesh` key of the istio ConfigMap, istiod's Helm values, or an IstioOperator. */
export type MeshConfigFormat = "mesh" | "helm" | "operator";

/** Path normalizations at least as strict as keygate's canonical form expects; others are raised to MERGE_SLASHES. */
const NORMALIZATIONS_KEPT = new Set(["MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"]);

/** The provider entry, in the field order Istio documents. */
export function providerEntry(provider: KeygateProvider): Record<string, unknown> {
  return {
    name: provider.name,
    envoyExtAuthzGrpc: {
      service: provider.service,
      port: provider.port,
      timeout: provider.timeout,
      // Fail closed, with 503 so that clients know a retry may pass.
      failOpen: false,
      statusOnError: "503",
    },
  };
}

/** The result of a merge: the merged document, and what changed beside the provider. */
export interface MeshMerge {
  yaml: string;
  notes: string[];
}

/** The map at `path` under the document's root, created if absent; an error names a non-map. */
function mapAt(doc: Document, path: readonly string[]): YAMLMap {
  if (doc.contents === null) doc.contents = new YAMLMap();
  let node: unknown = doc.contents;
  const walked: string[] = [];
  for (const key of path) {
    if (!isMap(node)) throw new Error(`${walked.join(".") || "the document"} is not a map`);
    walked.push(key);
    let next: unknown = node.get(key, true);
    if (next === undefined || next === null) {
      next = new YAMLMap();
      node.set(key, next);
    }
    node = next;
  }
  if (!isMap(node)) throw new Error(`${walked.join(".")} is not a map`);
  return node;
}

const MESH_PATH: Readonly<Record<MeshConfigFormat, readonly string[]>> = {
  mesh: [],
  helm: ["meshConfig"],
  operator: ["spec", "meshConfig"],
};

/**
 * Adds keygate's ext_authz provider to an existing mesh configuration and keeps everything else:
 * other providers, their order, comments and unrelated settings. A provider already named like
 * keygate's is replaced (so running it again changes nothing). A path normalization weaker than
 * MERGE_SLASHES is raised to it, and noted.
 */
export function mergeMeshConfig(text: string, format: MeshConfigFormat, provider: KeygateProvider = DEFAULT_PROVIDER): MeshMerge {
  const doc = parseDocument(text);
  if (doc.errors.length > 0) throw new Error(`not YAML: ${doc.errors[0]?.message ?? "parse error"}`);
  const mesh = mapAt(doc, MESH_PATH[format]);
  const notes: string[] = [];

  const existing: unknown = mesh.get("extensionProviders", true);
  let providers: YAMLSeq;
  if (existing === undefined || existing === null) {
    providers = new YAMLSeq();
    mesh.set("extensionProviders", providers);
  } else if (isSeq(existing)) {
    providers = existing;
  } else {
    throw new Error("extensionProviders is not a list");
  }
  const at = providers.items.findIndex((item) => isMap(item) && item.get("name") === provider.name);
  const entry = doc.createNode(providerEntry(provider));
  if (at >= 0) providers.items[at] = entry;
  else providers.items.push(entry);

  const normalization = mapAt(doc, [...MESH_PATH[format], "pathNormalization"]);
  const current = normalization.get("normalization");
  if (typeof current !== "string" || !NORMALIZATIONS_KEPT.has(current)) {
    normalization.set("normalization", "MERGE_SLASHES");
    notes.push(`pathNormalization.normalization: ${typeof current === "string" ? current : "unset (BASE)"} -> MERGE_SLASHES, so sidecars hand keygate and the app the same canonical path`);
  }
  return { yaml: doc.toString(), notes };
}
