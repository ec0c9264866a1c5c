import type { Route } from "../config.js";

/** What a route demands of a key. */
export interface RouteRequirements {
  requiredScopes: readonly string[];
  projectId: string | null;
  cost: number;
}

// Anything the slow path of normalizePath would change: a query or fragment, an escape, a
// segment that is empty or starts with a dot, or a trailing slash.
const NOT_NORMAL = /[?#%]|\/\/|\/\.|\/$/;

const NO_REQUIREMENTS: RouteRequirements = { requiredScopes: [], projectId: null, cost: 1 };

/**
 * Normalizes a request path before prefix matching, so "/v1//decks", "/v1/./decks",
 * "/v1/x/../decks" and "/v1/%64ecks" cannot slip past a route that guards "/v1/decks".
 */
export function normalizePath(rawPath: string): string {
  // Most paths are already normal: no query or fragment, escapes, empty, "." or ".." segments.
  if (rawPath.length > 1 && rawPath.charCodeAt(0) === 0x2f && !NOT_NORMAL.test(rawPath)) return rawPath;
  let path = rawPath;
  const cut = path.search(/[?#]/);
  if (cut >= 0) path = path.slice(0, cut);
  const out: string[] = [];
  for (const segment of path.split("/")) {
    let decoded: string;
    try {
      decoded = decodeURIComponent(segment);
    } catch {
      decoded = segment;
    }
    if (decoded === "" || decoded === ".") continue;
    if (decoded === "..") {
      out.pop();
      continue;
    }
    out.push(decoded);
  }
  return `/${out.join("/")}`;
}

/** The routes table from config, matched by method and longest path prefix. */
export class RouteTable {
  /** Longest prefix first, each with its prefix less any trailing slash. */
  readonly #routes: Array<{ route: Route; prefix: string }>;

  constructor(routes: readonly Route[]) {
    this.#routes = [...routes]
      .sort((a, b) => b.pathPrefix.length - a.pathPrefix.length)
      .map((route) => ({ route, prefix: route.pathPrefix.endsWith("/") ? route.pathPrefix.slice(0, -1) : route.pathPrefix }));
  }

  get isEmpty(): boolean {
    return this.#routes.length === 0;
  }

  /** The most specific route for the request, or null. */
  match(method: string, rawPath: string): Route | null {
    if (this.#routes.length === 0) return null;
    const path = normalizePath(rawPath);
    const upperMethod = method.toUpperCase();
    for (const { route, prefix } of this.#routes) {
      if (route.method !== "*" && route.method !== upperMethod) continue;
      if (prefix === "" || (path.startsWith(prefix) && (path.length === prefix.length || path.charCodeAt(prefix.length) === 0x2f))) return route;
    }
    return null;
  }

  /**
   * Envoy's per-route context_extensions win field by field; the routes table fills the rest.
   * A cost that is not a whole number is the proxy's misconfiguration: it throws, and the
   * caller answers INTERNAL rather than guess a price.
   */
  requirements(method: string, path: string, extensions: Readonly<Record<string, string>> | undefined): RouteRequirements {
    const route = this.match(method, path);
    const fromExt = extensions ?? {};
    const scopesText = fromExt["required_scopes"];
    const projectText = fromExt["project_id"];
    const costText = fromExt["cost"];
    if (route === null && scopesText === undefined && projectText === undefined && costText === undefined) return NO_REQUIREMENTS;
    let cost = route?.cost ?? 1;
    if (costText !== undefined) {
      if (!/^\d{1,9}$/.test(costText.trim())) throw new RouteConfigError(`context_extensions.cost must be a whole number, got "${costText}"`);
      cost = Number(costText.trim());
    }
    return {
      requiredScopes:
        scopesText !== undefined
          ? scopesText.split(",").map((s) => s.trim()).filter((s) => s.length > 0)
          : (route?.requiredScopes ?? []),
      projectId: projectText !== undefined && projectText.trim() !== "" ? projectText.trim() : (route?.projectId ?? null),
      cost,
    };
  }
}

/** A per-route setting from the proxy that keygate cannot use. */
export class RouteConfigError extends Error {
  override readonly name = "RouteConfigError";
}
