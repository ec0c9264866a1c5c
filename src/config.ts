import { readFileSync } from "node:fs";
import { isNode, isPair, isScalar, isSeq, LineCounter, parseDocument, visit } from "yaml";
import type { Document, Node, Pair } from "yaml";
import { z } from "zod";
import { DEFAULT_CHECK_BUDGET_MS } from "./authz/budget.js";
import { DEFAULT_GC_THREAD_NICE, MAX_GC_THREAD_NICE } from "./server/gc-threads.js";

/** Names of the account roles, used by role-based rate tiers. */
export const ROLES = ["standard", "premium", "admin"] as const;
/** Subscription states; only "active" passes the subscription step. */
export const SUBSCRIPTION_STATUSES = ["active", "none", "past_due", "canceled"] as const;
/** Key modes, the middle part of a key. */
export const KEY_MODES = ["live", "test"] as const;

/**
 * The largest window (in ms) times limit a rate limit may have: GCRA counts a bucket in parts of
 * 1/limit ms (limits.ts), and its sums must stay whole, exact numbers. 1,000,000 a second and
 * 10,000,000 a day are within it.
 */
export const MAX_RATE_PARTS = 2 ** 50;

/**
 * The largest rate limit number and key cap: KeyAdmin's RateLimit and Account messages carry them
 * as int32, and an account on a plan past it could be answered on no binary (gRPC) connection.
 */
export const MAX_INT32 = 2_147_483_647;
const INT32_MESSAGE = `must be at most ${MAX_INT32} (KeyAdmin sends it as a 32-bit integer)`;

/**
 * The largest credit allowance and daily quota. Redis answers counts as integers that ioredis
 * reads digit by digit in a double, which loses units in the last few below 2^53; 10^15 keeps
 * an allowance or a quota, and a balance with top-ups on it, far below that.
 */
export const MAX_AMOUNT = 1_000_000_000_000_000;
const AMOUNT_MESSAGE = `must be at most ${MAX_AMOUNT} (10^15)`;

/** A route's largest cost: ChargeUsage's, and the most a context_extensions cost can say (9 digits). */
export const MAX_ROUTE_COST = 1_000_000_000;

/**
 * The largest bound of each in-process cache: lru-cache allocates its tables for the whole bound
 * at start (about 50 bytes an entry with its TTL), so 10^7 is some 500 MB a cache; past 2^32 - 1
 * it cannot at all.
 */
export const MAX_CACHE_ENTRIES = 10_000_000;
const CACHE_ENTRIES_MESSAGE = `must be at most ${MAX_CACHE_ENTRIES} (the cache allocates its table for the whole bound at start)`;
/** A year: a longer cache lifetime is no bound on a revocation, and past some Redis refuses every L2 write. */
export const MAX_CACHE_TTL_SECONDS = 31_536_000;
const CACHE_TTL_MESSAGE = `must be at most ${MAX_CACHE_TTL_SECONDS} (a year)`;

const amount = z.number().int().min(0).max(MAX_AMOUNT, AMOUNT_MESSAGE);
const keyCap = z.number().int().min(0).max(MAX_INT32, INT32_MESSAGE);

const rateLimitSchema = z
  .strictObject({
    limit: z.number().int().positive().max(MAX_INT32, INT32_MESSAGE),
    windowSeconds: z.number().int().positive().max(MAX_INT32, INT32_MESSAGE),
  })
  .refine((rule) => rule.windowSeconds * 1000 * rule.limit <= MAX_RATE_PARTS, {
    message: `limit times windowSeconds must be at most ${Math.floor(MAX_RATE_PARTS / 1000)} (1000000 a second and 10000000 a day are within it)`,
  });

/** A named daily quota: lowercase letters, digits, "_" and "-". */
export const QUOTA_NAME_PATTERN = /^[a-z][a-z0-9_-]{0,31}$/;
const quotaName = z.string().regex(QUOTA_NAME_PATTERN, 'a quota name is lowercase letters, digits, "_" and "-", starting with a letter');

const planSchema = z.strictObject({
  maxActiveKeys: keyCap,
  rateLimit: rateLimitSchema,
  /** Requests a UTC day to metered routes that name no quota; null: unlimited. */
  dailyQuota: amount.nullable().default(null),
  /**
   * Named daily quotas, counted apart: a metered route with `quota: <name>` counts toward this
   * one instead of dailyQuota. A name the plan does not list (or null) is unlimited on it.
   */
  quotas: z.record(quotaName, amount.nullable()).default({}),
  monthlyCredits: amount.nullable().default(null),
});

/** A scope name: the policy's catalog and Envoy's per-route required_scopes are held to it. */
export const SCOPE_NAME_PATTERN = /^[a-z][a-z0-9_.:-]{0,63}$/;
const scopeName = z.string().regex(SCOPE_NAME_PATTERN, "a scope is lowercase letters, digits and _ . : -");

// A prefix is matched against canonical paths segment by segment, so it must be one itself, with
// only unreserved characters: then no escape in a request can stand for one of its segments. One
// segment may be PROJECT_SEGMENT: it matches any one segment, and names the request's project.
const CANONICAL_PREFIX = /^(?:\/(?:[A-Za-z0-9._~-]*[A-Za-z0-9_~-]|\{project\}))*\/?$/;

/** The path segment of a route prefix that matches any one segment and gives the project the key must be locked to (or unlocked). */
export const PROJECT_SEGMENT = "{project}";

const routeSchema = z.strictObject({
  /** HTTP method, or "*" for any. */
  // One method (any letter case) or "*": "GET,POST" would name a method no request has, and the
  // route would never match.
  method: z
    .string()
    .regex(/^(\*|[A-Za-z][A-Za-z-]*)$/, 'a method is one HTTP method, such as GET, or "*" for every method')
    .default("*")
    .transform((m) => m.toUpperCase()),
  pathPrefix: z
    .string()
    .startsWith("/")
    .regex(
      CANONICAL_PREFIX,
      'a path prefix is "/" or "/"-separated segments of letters, digits and - . _ ~ (no empty, "." or ".." segment, none ending in "."), as keygate matches canonical paths; one segment may be {project}',
    ),
  requiredScopes: z.array(scopeName).default([]),
  projectId: z.string().min(1).optional(),
  cost: z.number().int().min(0).max(MAX_ROUTE_COST, `must be at most ${MAX_ROUTE_COST} (10^9), as a ChargeUsage cost`).default(1),
  /**
   * Whether the route counts toward the daily quota and spends credits (its cost). An unmetered
   * route is never refused for either; the rate limit still applies. Default: metered.
   */
  metered: z.boolean().default(true),
  /** The lowest account role that may use the route (roles rank standard < premium < admin); unset: every role. */
  minRole: z.enum(ROLES).optional(),
  /** The named daily quota (plans' `quotas`) a metered route counts toward; unset: the plan's dailyQuota. */
  quota: quotaName.optional(),
});

/** The longest write-behind flush interval: one day. */
export const MAX_FLUSH_SECONDS = 86_400;

// Node timers hold at most 2^31 - 1 ms (about 24.8 days); a longer delay fires after 1 ms, so an
// interval past that would flush to the store in a busy loop. One day is far below the limit.
const AT_MOST_A_DAY = `must be at most ${MAX_FLUSH_SECONDS} (one day); it is in seconds`;
const flushSeconds = z.number().positive().max(MAX_FLUSH_SECONDS, AT_MOST_A_DAY).default(5);

/** lastUsedResolutionSeconds' default: a key's last use is kept to the minute. */
export const DEFAULT_LAST_USED_RESOLUTION_SECONDS = 60;

const FORWARDED_METADATA_NAME = /^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$/;
/** An HTTP field name (RFC 9110 token), lower-cased. */
const HEADER_NAME = /^[a-z0-9!#$%&'*+\-.^_`|~]{1,64}$/;
/**
 * Headers a proxy owns or that frame the message: a credential read from one of them would be
 * removed from the request on allow, which no proxy or upstream could live with.
 */
const NOT_CREDENTIAL_HEADERS: ReadonlySet<string> = new Set([
  "host", "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
  "content-length", "content-type", "content-encoding", "x-request-id", "x-forwarded-for", "x-forwarded-proto",
  "x-forwarded-host", "x-forwarded-uri", "x-forwarded-method", "x-original-uri", "x-original-method",
  "cookie", "forwarded", "via",
]);

/** Whether a credential header would be one of those, or of the proxy's own x-forwarded-* / x-original-* families. */
function proxyOrMessageHeader(name: string): boolean {
  return NOT_CREDENTIAL_HEADERS.has(name) || name.startsWith("x-forwarded-") || name.startsWith("x-original-");
}

/** ChargeUsage calls an account may make by default: 6,000 a minute. */
const DEFAULT_CHARGE_RATE_LIMIT = { limit: 6000, windowSeconds: 60 };

const policySchema = z
  .strictObject({
    defaultPlan: z.string().default("basic"),
    plans: z.record(z.string().regex(/^[a-z][a-z0-9_-]{0,31}$/), planSchema),
    scopes: z.strictObject({
      catalog: z.array(scopeName).min(1),
      default: z.array(scopeName).min(1),
    }),
    routes: z.array(routeSchema).default([]),
    /**
     * How paths meet route prefixes. caseInsensitive: true for upstreams that serve "/V1/Decks" as
     * "/v1/decks" (IIS, ASP.NET): matching ignores letter case. false (the default) matches case
     * exactly and refuses a path that would match another route with case ignored.
     */
    routeMatching: z.strictObject({ caseInsensitive: z.boolean().default(false) }).default({ caseInsensitive: false }),
    /**
     * Limits of test-mode keys (kg_test_…), kept apart from live keys': their own rate bucket per
     * account (or per key), their own daily quota, their own key cap, and no credits spent.
     * rateLimit null: the plan's; dailyQuota null: unlimited; maxActiveKeys null: the plan's cap.
     */
    testMode: z
      .strictObject({
        rateLimit: rateLimitSchema.nullable().default(null),
        dailyQuota: amount.nullable().default(null),
        maxActiveKeys: keyCap.nullable().default(null),
      })
      .default({ rateLimit: null, dailyQuota: null, maxActiveKeys: null }),
    /**
     * Key metadata entries the upstream is told, each as x-keygate-meta-<name> (a value that is
     * not printable ASCII is left out). Names are lowercase letters, digits and "-".
     */
    forwardMetadata: z
      .array(z.string().regex(FORWARDED_METADATA_NAME, 'a forwarded metadata name is lowercase letters, digits and "-" (it becomes x-keygate-meta-<name>)'))
      .max(16)
      .refine((names) => new Set(names).size === names.length, "names must not repeat")
      .default([]),
    credentialHeaders: z
      .array(
        z
          .string()
          .transform((h) => h.toLowerCase())
          .refine((h) => HEADER_NAME.test(h), "a credential header is an HTTP header name (letters, digits and !#$%&'*+-.^_`|~)")
          // x_keygate_owner_id is X-Keygate-Owner-Id to CGI-style apps (WSGI, PHP).
          .refine((h) => !h.replaceAll("_", "-").startsWith("x-keygate-"), "a credential header cannot be an x-keygate-* header (keygate sets those for the upstream)")
          .refine((h) => !proxyOrMessageHeader(h), "a credential header cannot be a connection or message header (host, connection, content-length, cookie, x-forwarded-*, ...)"),
      )
      .min(1)
      .refine((names) => new Set(names).size === names.length, "names must not repeat")
      .default(["authorization", "x-api-key"]),
    cache: z
      .strictObject({
        maxEntries: z.number().int().positive().max(MAX_CACHE_ENTRIES, CACHE_ENTRIES_MESSAGE).default(100_000),
        ttlSeconds: z.number().positive().max(MAX_CACHE_TTL_SECONDS, CACHE_TTL_MESSAGE).default(30),
        negativeMaxEntries: z.number().int().positive().max(MAX_CACHE_ENTRIES, CACHE_ENTRIES_MESSAGE).default(100_000),
        negativeTtlSeconds: z.number().positive().max(MAX_CACHE_TTL_SECONDS, CACHE_TTL_MESSAGE).default(5),
      })
      .default({ maxEntries: 100_000, ttlSeconds: 30, negativeMaxEntries: 100_000, negativeTtlSeconds: 5 }),
    lastUsedFlushSeconds: flushSeconds,
    /**
     * How far a key's last use on record may lag its latest Check: a use is recorded only when the
     * time on record is this old or more (or there is none), so a busy key costs the store one
     * write this often, not one every flush. 0 records every use.
     */
    lastUsedResolutionSeconds: z.number().int().min(0).max(MAX_FLUSH_SECONDS, AT_MOST_A_DAY).default(DEFAULT_LAST_USED_RESOLUTION_SECONDS),
    limits: z
      .strictObject({
        /** Whose requests share a rate-limit bucket. A key with its own limit always has its own. */
        rateLimitPer: z.enum(["account", "key"]).default("account"),
        /** Rate limits by account role; they replace the plan's limit for that role. */
        roleRateLimits: z.strictObject({ standard: rateLimitSchema, premium: rateLimitSchema, admin: rateLimitSchema }).partial().default({}),
        /**
         * When Redis fails: "fallback" counts in-process on each replica (the default), "fail-open"
         * lets requests through uncharged, "fail-closed" answers UNAVAILABLE.
         */
        onRedisError: z.enum(["fallback", "fail-open", "fail-closed"]).default("fallback"),
        /** How often counted usage and spent credits are written to the store. */
        usageFlushSeconds: flushSeconds,
        /**
         * ChargeUsage calls an account may make, in a bucket of their own: backend charging never
         * uses up the account's rate limit for Checks, and a runaway job is stopped.
         */
        chargeRateLimit: rateLimitSchema.default(DEFAULT_CHARGE_RATE_LIMIT),
      })
      .default({ rateLimitPer: "account", roleRateLimits: {}, onRedisError: "fallback", usageFlushSeconds: 5, chargeRateLimit: DEFAULT_CHARGE_RATE_LIMIT }),
  })
  .superRefine((policy, ctx) => {
    // Own names only: `in` would also find Object.prototype's ("constructor", "toString").
    if (!Object.hasOwn(policy.plans, policy.defaultPlan)) {
      ctx.addIssue({ code: "custom", path: ["defaultPlan"], message: `unknown plan "${policy.defaultPlan}"` });
    }
    const catalog = new Set(policy.scopes.catalog);
    policy.scopes.default.forEach((scope, i) => {
      if (!catalog.has(scope)) {
        ctx.addIssue({ code: "custom", path: ["scopes", "default", i], message: `"${scope}" is not in scopes.catalog` });
      }
    });
    const quotaNames = new Set(Object.values(policy.plans).flatMap((plan) => Object.keys(plan.quotas)));
    policy.routes.forEach((route, i) => {
      if (route.quota !== undefined && !quotaNames.has(route.quota)) {
        ctx.addIssue({ code: "custom", path: ["routes", i, "quota"], message: `no plan has a quota "${route.quota}" (plans' quotas: ${[...quotaNames].join(", ") || "none"})` });
      }
      const projectSegments = route.pathPrefix.split("/").filter((segment) => segment === PROJECT_SEGMENT).length;
      if (projectSegments > 1) ctx.addIssue({ code: "custom", path: ["routes", i, "pathPrefix"], message: `at most one ${PROJECT_SEGMENT} segment` });
      if (projectSegments > 0 && route.projectId !== undefined) {
        ctx.addIssue({ code: "custom", path: ["routes", i, "projectId"], message: `a route whose path names the project (${PROJECT_SEGMENT}) cannot also fix one` });
      }
      route.requiredScopes.forEach((scope, j) => {
        if (!catalog.has(scope)) {
          ctx.addIssue({ code: "custom", path: ["routes", i, "requiredScopes", j], message: `"${scope}" is not in scopes.catalog` });
        }
      });
      if (!route.metered && route.quota !== undefined) {
        ctx.addIssue({ code: "custom", path: ["routes", i, "quota"], message: "an unmetered route counts toward no quota; remove quota or set metered: true" });
      }
      if (!route.metered && route.cost > 1) {
        ctx.addIssue({ code: "custom", path: ["routes", i, "cost"], message: "an unmetered route spends no credits; remove cost or set metered: true" });
      }
      // At equal prefixes the route listed first wins: a later one for the same method, or any
      // method after a "*" one, would never match, and its scopes, role and cost would never
      // apply. (A HEAD route after GET's is judged as GET, which is what it is for: it loads.)
      const prefix = comparablePrefix(route.pathPrefix, policy.routeMatching.caseInsensitive);
      const earlier = policy.routes.findIndex(
        (other, k) => k < i && comparablePrefix(other.pathPrefix, policy.routeMatching.caseInsensitive) === prefix && (other.method === "*" || other.method === route.method),
      );
      if (earlier !== -1) {
        ctx.addIssue({
          code: "custom",
          path: ["routes", i],
          message: `never matches: routes.${earlier} (${policy.routes[earlier]?.method} ${policy.routes[earlier]?.pathPrefix}) comes first for the same path prefix${route.method === "*" ? "" : ` and method ${route.method}`}; at equal prefixes the first route listed wins, so list the more specific method first or merge them`,
        });
      }
    });
  });

/** A route prefix as matching compares it: without a trailing "/", letter case folded when matching ignores it. */
function comparablePrefix(pathPrefix: string, caseInsensitive: boolean): string {
  const bare = pathPrefix.length > 1 && pathPrefix.endsWith("/") ? pathPrefix.slice(0, -1) : pathPrefix;
  return caseInsensitive ? bare.toLowerCase() : bare;
}

/** Plans, scopes, routes and cache bounds: the YAML policy after validation. */
export type Policy = z.infer<typeof policySchema>;
/** One plan's limits. */
export type Plan = z.infer<typeof planSchema>;
/** A rate limit: `limit` requests per `windowSeconds`. */
export type RateLimitRule = z.infer<typeof rateLimitSchema>;
/** One entry of the routes table. */
export type Route = z.infer<typeof routeSchema>;
/** The policy's routeMatching options. */
export type RouteMatching = z.infer<typeof policySchema>["routeMatching"];

/** The built-in policy: plan caps and rates follow the documents keygate was designed from. */
export const DEFAULT_POLICY_INPUT = {
  defaultPlan: "basic",
  plans: {
    basic: { maxActiveKeys: 1, rateLimit: { limit: 100, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: null },
    pro: { maxActiveKeys: 3, rateLimit: { limit: 500, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: null },
    business: { maxActiveKeys: 5, rateLimit: { limit: 1000, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: null },
  },
  scopes: { catalog: ["read", "write", "admin"], default: ["read"] },
  routes: [],
};

const WHOLE_DECIMAL = /^[0-9]+$/;
const FRACTION_DECIMAL = /^(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)$/;

/**
 * A KEYGATE_* number variable's text as a number: decimal digits (and a fraction where
 * `digits` is "fraction"), surrounding blanks ignored. Not z.coerce: Number() reads "" and " " as
 * 0 (a variable a template left empty would listen on a port the kernel picks, or drain for 0 s)
 * and takes "0x1F90" and "1e3", which no one means as a port.
 */
function decimal(digits: "whole" | "fraction", message: string) {
  const pattern = digits === "whole" ? WHOLE_DECIMAL : FRACTION_DECIMAL;
  return z.string().transform((text, ctx) => {
    const trimmed = text.trim();
    if (trimmed === "") {
      ctx.addIssue({ code: "custom", message: "must not be empty" });
      return z.NEVER;
    }
    if (!pattern.test(trimmed)) {
      ctx.addIssue({ code: "custom", message });
      return z.NEVER;
    }
    return Number(trimmed);
  });
}

/** A whole-number variable from `min` to `max`; `message` says so, for a bad form and a value out of range alike. */
function wholeNumber(min: number, max: number, message = `must be a whole number from ${min} to ${max}`) {
  return decimal("whole", message).pipe(z.number().min(min, message).max(max, message));
}

const port = wholeNumber(0, 65535);
const SECONDS_0_TO_300 = "must be a number of seconds from 0 to 300";
/**
 * A start's wait for a MongoDB or Redis that does not answer yet (a cluster starting together, a
 * store restarting): shorter than the 60 s the manifests' startupProbe gives a start, so a replica
 * that gives up is restarted by the kubelet rather than killed by the probe.
 */
const DEFAULT_STARTUP_WAIT_SECONDS = 30;
const shutdownSeconds = decimal("fraction", SECONDS_0_TO_300).pipe(z.number().min(0, SECONDS_0_TO_300).max(300, SECONDS_0_TO_300));
// Fractions are allowed (tests use tenths of a second); an hour is far past any sane value.
const TIMEOUT_SECONDS = "must be a number of seconds above 0, at most 3600";
// The listeners take whole ms, and Node's HTTP server reads 0 ms as no timeout at all (while the
// h2 acceptors would drop every connection at once): a value must be 1 ms or more. (0 and below
// are positive()'s to refuse, with the message a bad form gets.)
const TIMEOUT_UNDER_1_MS = "must be at least 0.001 (1 ms); a timeout of 0 ms is no timeout";
const timeoutSeconds = decimal("fraction", TIMEOUT_SECONDS).pipe(
  z
    .number()
    .positive(TIMEOUT_SECONDS)
    .max(3600, TIMEOUT_SECONDS)
    .refine((seconds) => seconds <= 0 || seconds >= 0.001, TIMEOUT_UNDER_1_MS),
);

/**
 * Which proxy calls the HTTP authorization port, and so where the judged method and path come
 * from: envoy, the path below /check and the request's own method; nginx, X-Original-URI and
 * X-Original-Method; caddy and traefik, X-Forwarded-Uri and X-Forwarded-Method.
 */
export const HTTP_AUTHZ_PROXIES = ["envoy", "nginx", "caddy", "traefik"] as const;
/** One of HTTP_AUTHZ_PROXIES. */
export type HttpAuthzProxy = (typeof HTTP_AUTHZ_PROXIES)[number];

/**
 * What serves Check and gRPC health on the gRPC port: h2, keygate's own strict unary gRPC server
 * on node:http2; grpc-js, the @grpc/grpc-js server, kept as a fallback.
 */
export const GRPC_ENGINES = ["h2", "grpc-js"] as const;
/** One of GRPC_ENGINES. */
export type GrpcEngine = (typeof GRPC_ENGINES)[number];

/** A host and port of a Redis node or Sentinel. */
export interface RedisAddress {
  host: string;
  port: number;
}

/** Credentials sent to Redis (AUTH); both absent for none. */
export interface RedisCredentials {
  username: string | undefined;
  password: string | undefined;
}

/**
 * How keygate reaches Redis, from KEYGATE_REDIS_URL: one server (`redis://`, `rediss://`), a
 * Redis Cluster from seed nodes (`redis+cluster://h1:7000,h2:7001`), or the master a set of
 * Sentinels names (`redis+sentinel://s1:26379,s2:26379/mymaster`). `tls` is the `rediss` form.
 */
export type RedisTopology =
  | { kind: "standalone"; url: string }
  | ({ kind: "cluster"; nodes: RedisAddress[]; tls: boolean } & RedisCredentials)
  | ({
      kind: "sentinel";
      sentinels: RedisAddress[];
      masterName: string;
      db: number;
      tls: boolean;
      sentinelUsername: string | undefined;
      sentinelPassword: string | undefined;
    } & RedisCredentials);

// scheme, userinfo (up to the last "@" before the path), hosts, path, query. Passwords with
// "/", "?", "#" or "@" are percent-encoded, as in any URL.
const MULTI_HOST_URL = /^(rediss?)\+(cluster|sentinel):\/\/(?:([^/?#]*)@)?([^/?#@]*)(\/[^?#]*)?(?:\?([^#]*))?$/;
const HOST_PORT = /^(?:\[([0-9a-fA-F:.]+)\]|([A-Za-z0-9._-]+))(?::(\d{1,5}))?$/;
const MASTER_NAME = /^[A-Za-z0-9._-]{1,128}$/;
const SENTINEL_QUERY = new Set(["sentinelUsername", "sentinelPassword", "db"]);

const UNPARSED_URL = "is not a valid URL; percent-encode / ? # @ % in the user name and password";

/**
 * Whether a redis:// or rediss:// URL reads as ioredis reads it (WHATWG URL, then the user info
 * percent-decoded), and not as a host cut short by a password's unescaped "/", "?" or "#" that
 * pushes the "@" and the real host into the path, query or fragment.
 */
function standaloneUrlParses(url: string): boolean {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    return false;
  }
  if (parsed.hash !== "" || `${parsed.pathname}${parsed.search}`.includes("@")) return false;
  return parseUserinfo(`${parsed.username}:${parsed.password}`) !== null;
}

/**
 * Parses KEYGATE_REDIS_URL; a bad form adds an issue saying what is wrong. Messages never
 * repeat the URL, which may hold a password.
 */
function parseRedisUrl(url: string, ctx: z.RefinementCtx): RedisTopology {
  const fail = (message: string): RedisTopology => {
    ctx.addIssue({ code: "custom", message });
    return z.NEVER;
  };
  if (/^rediss?:\/\//.test(url)) return standaloneUrlParses(url) ? { kind: "standalone", url } : fail(UNPARSED_URL);
  const match = MULTI_HOST_URL.exec(url);
  if (match === null) {
    return fail("must start with redis://, rediss://, redis+cluster://, rediss+cluster://, redis+sentinel:// or rediss+sentinel:// (one host:port list, no fragment)");
  }
  const [, scheme = "", kind = "", userinfo, hostList = "", path = "", query = ""] = match;
  const credentials = parseUserinfo(userinfo);
  if (credentials === null) return fail("the user name and password must be percent-encoded (user:password@)");
  const defaultPort = kind === "cluster" ? 6379 : 26379;
  const addresses: RedisAddress[] = [];
  for (const part of hostList.split(",")) {
    const hostPort = HOST_PORT.exec(part.trim());
    const port = Number(hostPort?.[3] ?? defaultPort);
    const host = hostPort?.[1] ?? hostPort?.[2];
    if (host === undefined || !Number.isInteger(port) || port < 1 || port > 65535) {
      return fail(`each ${kind === "cluster" ? "seed node" : "Sentinel"} is host:port (port 1-65535), separated by commas`);
    }
    addresses.push({ host, port });
  }
  const params = new URLSearchParams(query);
  const tls = scheme === "rediss";
  if (kind === "cluster") {
    if (path !== "" && path !== "/" && path !== "/0") return fail("a Redis Cluster has only database 0: leave the path empty");
    if ([...params.keys()].length > 0) return fail("redis+cluster:// takes no query parameters");
    return { kind: "cluster", nodes: addresses, tls, ...credentials };
  }
  const segments = path.split("/").filter((s) => s !== "");
  const masterName = segments[0];
  if (masterName === undefined || !MASTER_NAME.test(masterName)) return fail("redis+sentinel:// needs the master's name as its path: redis+sentinel://host:26379/mymaster");
  for (const name of params.keys()) if (!SENTINEL_QUERY.has(name)) return fail(`unknown query parameter "${name.slice(0, 40)}" (known: ${[...SENTINEL_QUERY].join(", ")})`);
  const dbText = segments[1] ?? params.get("db") ?? "0";
  if (segments.length > 2 || !/^\d{1,2}$/.test(dbText)) return fail("the database is a number after the master's name (/mymaster/0) or ?db=");
  return {
    kind: "sentinel",
    sentinels: addresses,
    masterName,
    db: Number(dbText),
    tls,
    ...credentials,
    sentinelUsername: params.get("sentinelUsername") ?? undefined,
    sentinelPassword: params.get("sentinelPassword") ?? undefined,
  };
}

/** "user:password", ":password" or "user", percent-decoded; null when it does not decode. */
function parseUserinfo(userinfo: string | undefined): RedisCredentials | null {
  if (userinfo === undefined || userinfo === "") return { username: undefined, password: undefined };
  const colon = userinfo.indexOf(":");
  const rawUser = colon < 0 ? userinfo : userinfo.slice(0, colon);
  const rawPassword = colon < 0 ? undefined : userinfo.slice(colon + 1);
  try {
    const username = rawUser === "" ? undefined : decodeURIComponent(rawUser);
    const password = rawPassword === undefined || rawPassword === "" ? undefined : decodeURIComponent(rawPassword);
    return { username, password };
  } catch {
    return null;
  }
}

// The password in a URL's user info as WHATWG URL (and so ioredis) reads it, up to the
// authority's last "@", and as the MongoDB driver reads it, up to the first "@".
const PASSWORD_AS_URL = /^[^:/?#]+:\/\/[^/?#:]*:([^/?#]*)@/;
const PASSWORD_AS_MONGODB = /^[^/]+:\/\/[^:@]*:([^@]*)@/;

/** A URL's password in every form a library's error might quote: as written and percent-decoded. */
function urlPasswords(url: string): string[] {
  const written = [PASSWORD_AS_URL.exec(url)?.[1], PASSWORD_AS_MONGODB.exec(url)?.[1]].filter((p): p is string => p !== undefined);
  return written.flatMap((password) => {
    try {
      return [password, decodeURIComponent(password)];
    } catch {
      return [password];
    }
  });
}

/**
 * The passwords KEYGATE_REDIS_URL and KEYGATE_MONGODB_URI hold, for the log redaction: a client
 * library's error may quote the URL or the password it decoded from it.
 */
export function connectionPasswords(config: Pick<Config, "redis" | "mongodbUri">): string[] {
  const redis = config.redis;
  const found = [
    // ioredis also takes the password as a query parameter (?password=).
    ...(redis?.kind === "standalone" ? [...urlPasswords(redis.url), URL.parse(redis.url)?.searchParams.get("password") ?? undefined] : []),
    redis === undefined || redis.kind === "standalone" ? undefined : redis.password,
    redis?.kind === "sentinel" ? redis.sentinelPassword : undefined,
    ...(config.mongodbUri === undefined ? [] : urlPasswords(config.mongodbUri)),
  ];
  return [...new Set(found)].filter((password): password is string => password !== undefined && password !== "");
}

/** OTEL_TRACES_SAMPLER values keygate understands (the SDK's built-in samplers). */
export const TRACE_SAMPLERS = ["always_on", "always_off", "traceidratio", "parentbased_always_on", "parentbased_always_off", "parentbased_traceidratio"] as const;
/** One of TRACE_SAMPLERS. */
export type TraceSampler = (typeof TRACE_SAMPLERS)[number];
/** OTLP transports keygate can send traces with (OTLP over HTTP; gRPC is not built in). */
export const OTLP_PROTOCOLS = ["http/protobuf", "http/json"] as const;
/** One of OTLP_PROTOCOLS. */
export type OtlpProtocol = (typeof OTLP_PROTOCOLS)[number];
const otlpUrl = z.url({ protocol: /^https?$/, error: "must be an http:// or https:// URL" });
const otlpProtocol = z.enum(OTLP_PROTOCOLS, { error: `must be one of ${OTLP_PROTOCOLS.join(", ")} (OTLP over gRPC is not supported)` });
/** The OTLP/HTTP collector's default traces URL (the OpenTelemetry spec's). */
export const DEFAULT_OTLP_TRACES_URL = "http://localhost:4318/v1/traces";

/** keygate's three listeners, as KEYGATE_TLS_LISTENERS and KEYGATE_TLS_CLIENT_AUTH_LISTENERS name them. */
export const LISTENER_NAMES = ["grpc", "http", "admin"] as const;
/** One of LISTENER_NAMES. */
export type ListenerId = (typeof LISTENER_NAMES)[number];

// A comma-separated set of listener names; unset stays undefined (the default applies later).
const listenerList = z
  .string()
  .optional()
  .transform((v) => (v === undefined ? undefined : v.split(",").map((name) => name.trim()).filter((name) => name.length > 0)))
  .pipe(
    z
      .array(z.enum(LISTENER_NAMES, { error: `each listener must be one of ${LISTENER_NAMES.join(", ")}` }))
      .min(1, `name at least one of ${LISTENER_NAMES.join(", ")}`)
      .optional(),
  );

const GC_THREAD_NICE_RANGE = `must be a whole number from 0 to ${MAX_GC_THREAD_NICE}`;

/** A KEYGATE_GC_THREAD_NICE value (0 to 19); the bench's --gc-thread-nice takes the same. */
export const gcThreadNiceSchema = wholeNumber(0, MAX_GC_THREAD_NICE, GC_THREAD_NICE_RANGE);

const envSchema = z.object({
  KEYGATE_DATA_DIR: z.string().min(1).default("./data"),
  KEYGATE_MONGODB_URI: z.string().regex(/^mongodb(\+srv)?:\/\//, "must start with mongodb:// or mongodb+srv://").optional(),
  KEYGATE_REDIS_URL: z.string().transform(parseRedisUrl).optional(),
  KEYGATE_PEPPER: z.string().min(32, "must be at least 32 characters").optional(),
  KEYGATE_ADMIN_TOKENS: z
    .string()
    .optional()
    .transform((v) => (v === undefined ? undefined : v.split(",").map((t) => t.trim()).filter((t) => t.length > 0)))
    .refine((v) => v === undefined || (v.length > 0 && v.every((t) => t.length >= 24)), "each token must be at least 24 characters"),
  KEYGATE_ADMIN_TOKENS_FILE: z.string().min(1).optional(),
  KEYGATE_KEY_PREFIX: z.string().regex(/^[a-z][a-z0-9]{1,9}$/, "2-10 lowercase letters or digits, starting with a letter").default("kg"),
  KEYGATE_CONFIG: z.string().min(1).optional(),
  KEYGATE_HOST: z.string().min(1).default("0.0.0.0"),
  KEYGATE_GRPC_PORT: port.default(9191),
  KEYGATE_GRPC_ENGINE: z.enum(GRPC_ENGINES, { error: `must be one of ${GRPC_ENGINES.join(", ")}` }).default("h2"),
  KEYGATE_HTTP_AUTHZ_PORT: port.default(8181),
  // envoy by default: a proxy that sends X-Original-* or X-Forwarded-* headers to a keygate left
  // at the default is refused, never judged on a path it did not mean.
  KEYGATE_HTTP_AUTHZ_PROXY: z.enum(HTTP_AUTHZ_PROXIES, { error: `must be one of ${HTTP_AUTHZ_PROXIES.join(", ")}` }).default("envoy"),
  KEYGATE_ADMIN_PORT: port.default(8080),
  KEYGATE_LOG_LEVEL: z.enum(["trace", "debug", "info", "warn", "error", "fatal", "silent"]).default("info"),
  KEYGATE_SHUTDOWN_GRACE_SECONDS: shutdownSeconds.default(20),
  KEYGATE_CHECK_BUDGET_MS: wholeNumber(10, 60_000).default(DEFAULT_CHECK_BUDGET_MS),
  KEYGATE_GC_THREAD_NICE: gcThreadNiceSchema.default(DEFAULT_GC_THREAD_NICE),
  KEYGATE_SHUTDOWN_DELAY_SECONDS: shutdownSeconds.default(0),
  KEYGATE_STARTUP_WAIT_SECONDS: shutdownSeconds.default(DEFAULT_STARTUP_WAIT_SECONDS),
  KEYGATE_ADMIN_MAX_BODY_BYTES: wholeNumber(1024, 16 * 1024 * 1024).default(64 * 1024),
  KEYGATE_HEADERS_TIMEOUT_SECONDS: timeoutSeconds.default(10),
  KEYGATE_REQUEST_TIMEOUT_SECONDS: timeoutSeconds.default(30),
  KEYGATE_IDLE_TIMEOUT_SECONDS: timeoutSeconds.default(65),
  KEYGATE_MAX_CONNECTIONS: wholeNumber(1, 1_000_000).optional(),
  KEYGATE_ACCESS_LOG_SAMPLE: decimal("fraction", "must be a number from 0 to 1").pipe(z.number().min(0, "must be from 0 to 1").max(1, "must be from 0 to 1")).default(0),
  // OpenTelemetry's own variables (opentelemetry.io/docs/specs/otel/configuration/sdk-environment-variables).
  // The spec reads booleans case-insensitively.
  OTEL_SDK_DISABLED: z
    .string()
    .transform((v) => v.toLowerCase())
    .pipe(z.enum(["true", "false"], { error: 'must be "true" or "false"' }))
    .optional(),
  OTEL_TRACES_EXPORTER: z.enum(["otlp", "none"], { error: 'keygate exports traces with "otlp" only; "none" (or unset) leaves them off' }).optional(),
  OTEL_EXPORTER_OTLP_ENDPOINT: otlpUrl.optional(),
  OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: otlpUrl.optional(),
  OTEL_EXPORTER_OTLP_PROTOCOL: otlpProtocol.optional(),
  OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: otlpProtocol.optional(),
  OTEL_SERVICE_NAME: z.string().min(1).default("keygate"),
  OTEL_TRACES_SAMPLER: z.enum(TRACE_SAMPLERS, { error: `must be one of ${TRACE_SAMPLERS.join(", ")}` }).default("parentbased_always_on"),
  OTEL_TRACES_SAMPLER_ARG: z.coerce.number({ error: "must be a ratio from 0 to 1" }).min(0, "must be a ratio from 0 to 1").max(1, "must be a ratio from 0 to 1").optional(),
  OTEL_BSP_SCHEDULE_DELAY: z.coerce.number().int().min(0).max(60_000).default(1000),
  KEYGATE_TLS_CERT_FILE: z.string().min(1).optional(),
  KEYGATE_TLS_KEY_FILE: z.string().min(1).optional(),
  KEYGATE_TLS_CLIENT_CA_FILE: z.string().min(1).optional(),
  KEYGATE_TLS_LISTENERS: listenerList,
  KEYGATE_TLS_CLIENT_AUTH_LISTENERS: listenerList,
  KEYGATE_REDIS_TLS_CA_FILE: z.string().min(1).optional(),
  KEYGATE_REDIS_TLS_CERT_FILE: z.string().min(1).optional(),
  KEYGATE_REDIS_TLS_KEY_FILE: z.string().min(1).optional(),
});

/**
 * Where and how decision traces go; undefined when tracing is off. On: OTEL_TRACES_EXPORTER=otlp, or
 * an OTLP endpoint set with OTEL_TRACES_EXPORTER unset; never with OTEL_SDK_DISABLED=true or
 * OTEL_TRACES_EXPORTER=none.
 */
export interface TracingSettings {
  /** The OTLP/HTTP traces URL, e.g. http://collector:4318/v1/traces. */
  url: string;
  protocol: OtlpProtocol;
  serviceName: string;
  sampler: TraceSampler;
  /** The ratio of the traceidratio samplers. */
  samplerRatio: number;
  /** How long a finished span may wait before its batch is sent. */
  scheduleDelayMs: number;
}

/**
 * TLS on the listeners: the certificate and key (PEM files, reloaded when they change on disk),
 * the CA client certificates must be signed by, and which listeners use each.
 */
export interface TlsSettings {
  certFile: string;
  keyFile: string;
  /** Set: the listeners in clientAuthListeners require a client certificate signed by it (mTLS). */
  clientCaFile: string | undefined;
  listeners: ReadonlySet<ListenerId>;
  /** Empty when clientCaFile is unset. */
  clientAuthListeners: ReadonlySet<ListenerId>;
}

/** TLS options of the Redis connections (the URL must be rediss://); files read once, at start. */
export interface RedisTlsSettings {
  caFile: string | undefined;
  certFile: string | undefined;
  keyFile: string | undefined;
}

/** Everything keygate reads from its environment and policy file. */
export interface Config {
  dataDir: string;
  mongodbUri: string | undefined;
  /** Where Redis is (KEYGATE_REDIS_URL): one server, a Cluster, or a Sentinel-managed master. */
  redis: RedisTopology | undefined;
  pepper: string | undefined;
  adminTokens: string[] | undefined;
  /** A YAML file of named admin tokens, each with its permissions (src/admin/permissions.ts). */
  adminTokensFile: string | undefined;
  keyPrefix: string;
  host: string;
  grpcPort: number;
  /** Which server implementation answers on the gRPC port. */
  grpcEngine: GrpcEngine;
  httpAuthzPort: number;
  /** The proxy in front of the HTTP authorization port: the one source of the judged request. */
  httpAuthzProxy: HttpAuthzProxy;
  adminPort: number;
  logLevel: z.infer<typeof envSchema>["KEYGATE_LOG_LEVEL"];
  shutdownGraceSeconds: number;
  /** The most one Check may wait on L2, the store and the Redis meter before it answers UNAVAILABLE. */
  checkBudgetMs: number;
  /** The nice value of V8's GC worker threads (KEYGATE_GC_THREAD_NICE; 0 leaves them as they are). */
  gcThreadNice: number;
  /** After SIGTERM: report not-ready but keep serving this long, so load balancers move away first. */
  shutdownDelaySeconds: number;
  /** How long a start keeps trying a MongoDB or Redis that does not answer before it gives up (exit 2). */
  startupWaitSeconds: number;
  /** Largest admin request message, as sent and after decompression. */
  adminMaxBodyBytes: number;
  /** Timeouts and the connection cap of every listener. */
  listeners: ListenerSettings;
  /** Decision traces over OTLP; undefined: tracing is off (the default). */
  tracing: TracingSettings | undefined;
  /** Share of decided Checks written to the access log at info level, 0 (off, the default) to 1. */
  accessLogSampleRate: number;
  policy: Policy;
  /** The policy's file (KEYGATE_CONFIG); undefined for the built-in policy. */
  policyFile: string | undefined;
  /** TLS on the listeners; null: every listener is plaintext. */
  tls: TlsSettings | null;
  /** Extra TLS options for rediss:// (a private CA, a client certificate); null: none. */
  redisTls: RedisTlsSettings | null;
}

/**
 * How long each listener waits for a peer, and how many connections it holds at once.
 * `maxConnections` null means: derived from the process's open-file limit at start.
 */
export interface ListenerSettings {
  /** A request head, or the HTTP/2 preface and SETTINGS, or a PING acknowledgement, must arrive within this. */
  headersTimeoutMs: number;
  /** A whole request (head and body) must arrive within this. */
  requestTimeoutMs: number;
  /** A connection with no request or stream in flight is closed after this. */
  idleTimeoutMs: number;
  maxConnections: number | null;
}

/** A configuration problem; the message names the variable or policy field. */
export class ConfigError extends Error {
  override readonly name = "ConfigError";
}

function describeIssues(prefix: string, error: z.ZodError): string {
  return error.issues
    .map((issue) => `${prefix}${issue.path.map(String).join(".")}: ${issue.message}`)
    .join("; ");
}

/** Validates a policy object (parsed YAML or the built-in default). */
export function parsePolicy(input: unknown, source = "policy"): Policy {
  const result = policySchema.safeParse(input);
  if (!result.success) throw new ConfigError(`invalid ${source}: ${describeIssues("", result.error)}`);
  return result.data;
}

/** Reads and validates a YAML policy file. */
export function loadPolicyFile(path: string): Policy {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (cause) {
    throw new ConfigError(`KEYGATE_CONFIG: cannot read ${path}`, { cause });
  }
  const parsed = parseYamlText(text);
  if (!parsed.ok) {
    const { problem } = parsed;
    const field = problem.field === "" ? "" : `, in ${problem.field}`;
    throw new ConfigError(`KEYGATE_CONFIG: ${path} is not valid YAML: ${describeYamlProblem(problem)}${field}`);
  }
  return parsePolicy(parsed.value, `KEYGATE_CONFIG (${path})`);
}

/** What is wrong with a YAML text, and where: never a piece of the text itself. */
export interface YamlProblem {
  /** The yaml library's code: DUPLICATE_KEY, BAD_INDENT, TAG_RESOLVE_FAILED, BAD_ALIAS, ... */
  code: string;
  /** 1-based; null when the problem has no one place (too many aliases). */
  line: number | null;
  column: number | null;
  /** The field the problem is in, as dotted keys and indexes ("routes.0.requiredScopes"); "" when none. */
  field: string;
}

/**
 * Parses one YAML document. Errors, warnings (an unknown tag, read as "" otherwise) and an alias
 * with no anchor all fail it, and are told by code and place only: the library's messages quote
 * the text (the alias or tag, a source excerpt), and a file of admin tokens is secrets.
 */
export function parseYamlText(text: string): { ok: true; value: unknown } | { ok: false; problem: YamlProblem } {
  const lines = new LineCounter();
  // logLevel "error": nothing goes through process.emitWarning, which Node prints to stderr
  // outside the log; "silent" would also drop the error of a second document in the file.
  const doc = parseDocument(text, { prettyErrors: false, logLevel: "error", lineCounter: lines });
  const at = (code: string, offset: number): { ok: false; problem: YamlProblem } => {
    const { line, col } = lines.linePos(offset);
    return { ok: false, problem: { code, line, column: col, field: fieldAt(doc, offset) } };
  };
  const first = doc.errors[0] ?? doc.warnings[0];
  if (first !== undefined) return at(first.code, first.pos[0]);
  const alias = unresolvedAliasAt(doc);
  if (alias !== null) return at("BAD_ALIAS", alias);
  try {
    return { ok: true, value: doc.toJS() };
  } catch {
    // With every alias resolved, only the library's cap on alias expansion is left to refuse.
    return { ok: false, problem: { code: "RESOURCE_EXHAUSTION", line: null, column: null, field: "" } };
  }
}

/** A YamlProblem's code and place, with the usual cause of the codes an unquoted "*" or "!" value gives. */
export function describeYamlProblem(problem: YamlProblem): string {
  const place = problem.line === null ? "" : ` at line ${problem.line}, column ${problem.column ?? 1}`;
  const hint = problem.code === "BAD_ALIAS" || problem.code === "TAG_RESOLVE_FAILED" ? ' (quote a value that starts with "*" or "!")' : "";
  return `${problem.code}${place}${hint}`;
}

/** Where the first alias that names no earlier anchor is; null when every alias resolves. */
function unresolvedAliasAt(doc: Document.Parsed): number | null {
  let offset: number | null = null;
  visit(doc, {
    Alias(_key, node) {
      if (node.resolve(doc) !== undefined) return undefined;
      offset = node.range?.[0] ?? 0;
      return visit.BREAK;
    },
  });
  return offset;
}

/**
 * The dotted path of the deepest node, or key and value pair, that holds the offset: map keys and
 * sequence indexes. A pair spans its key to its value's end, so that what lies between them (a
 * tag, whose empty value starts after it) is in that field.
 */
function fieldAt(doc: Document.Parsed, offset: number): string {
  let field = "";
  const holds = (start: number | undefined, end: number | undefined): boolean => start !== undefined && end !== undefined && start <= offset && offset < end;
  visit(doc, {
    Node(_key, node, ancestors) {
      if (holds(node.range?.[0], node.range?.[2])) field = fieldPath([...ancestors, node]);
      return undefined;
    },
    Pair(_key, pair, ancestors) {
      const start = isNode(pair.key) ? pair.key.range?.[0] : undefined;
      const end = isNode(pair.value) ? pair.value.range?.[2] : isNode(pair.key) ? pair.key.range?.[2] : undefined;
      if (holds(start, end)) field = fieldPath([...ancestors, pair]);
      return undefined;
    },
  });
  return field;
}

/** A chain of YAML nodes, outermost first, as "plans.basic.rateLimit" or "routes.0.pathPrefix". */
function fieldPath(chain: readonly (Document | Node | Pair)[]): string {
  const parts: string[] = [];
  chain.forEach((item, i) => {
    const next = chain[i + 1];
    if (isPair(item)) parts.push(isScalar(item.key) ? String(item.key.value) : "?");
    else if (isSeq(item) && next !== undefined) parts.push(String(item.items.indexOf(next)));
  });
  return parts.join(".");
}

/**
 * Tracing is on when OTEL_TRACES_EXPORTER is otlp, or when it is unset and an OTLP endpoint is
 * given; OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none turn it off whatever else is set.
 * The traces endpoint is used as given; the general one gets /v1/traces appended, as the spec says.
 */
function tracingSettings(e: z.infer<typeof envSchema>): TracingSettings | undefined {
  if (e.OTEL_SDK_DISABLED === "true") return undefined;
  const exporter = e.OTEL_TRACES_EXPORTER;
  if (exporter === "none") return undefined;
  const endpointSet = e.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT !== undefined || e.OTEL_EXPORTER_OTLP_ENDPOINT !== undefined;
  if (exporter === undefined && !endpointSet) return undefined;
  const general = e.OTEL_EXPORTER_OTLP_ENDPOINT;
  const url = e.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT ?? (general === undefined ? DEFAULT_OTLP_TRACES_URL : `${general.replace(/\/+$/, "")}/v1/traces`);
  return {
    url,
    protocol: e.OTEL_EXPORTER_OTLP_TRACES_PROTOCOL ?? e.OTEL_EXPORTER_OTLP_PROTOCOL ?? "http/protobuf",
    serviceName: e.OTEL_SERVICE_NAME,
    sampler: e.OTEL_TRACES_SAMPLER,
    samplerRatio: e.OTEL_TRACES_SAMPLER_ARG ?? 1,
    scheduleDelayMs: e.OTEL_BSP_SCHEDULE_DELAY,
  };
}

/** Parses the environment once; bad values fail with a message naming the variable. */
export function loadConfig(env: NodeJS.ProcessEnv = process.env): Config {
  // OpenTelemetry treats an empty OTEL_* variable as unset (a manifest may set it to ""). A port
  // variable holding a service link (a Service named keygate-admin sets KEYGATE_ADMIN_PORT to
  // tcp://10.0.0.1:8080) was never set by the operator: unset too (ignoredVariables names it).
  const result = envSchema.safeParse(
    Object.fromEntries(Object.entries(env).filter(([name, value]) => !(name.startsWith("OTEL_") && value === "") && !linkedPortVariable(name, value ?? ""))),
  );
  if (!result.success) throw new ConfigError(`invalid environment: ${describeIssues("", result.error)}`);
  const e = result.data;
  if (e.KEYGATE_HEADERS_TIMEOUT_SECONDS > e.KEYGATE_REQUEST_TIMEOUT_SECONDS) {
    throw new ConfigError("invalid environment: KEYGATE_HEADERS_TIMEOUT_SECONDS must not exceed KEYGATE_REQUEST_TIMEOUT_SECONDS (the head is part of the request)");
  }
  const tls = tlsSettings(e);
  const redisTls = redisTlsSettings(e);
  const policy = e.KEYGATE_CONFIG === undefined ? parsePolicy(DEFAULT_POLICY_INPUT, "built-in policy") : loadPolicyFile(e.KEYGATE_CONFIG);
  return {
    dataDir: e.KEYGATE_DATA_DIR,
    policyFile: e.KEYGATE_CONFIG,
    mongodbUri: e.KEYGATE_MONGODB_URI,
    redis: e.KEYGATE_REDIS_URL,
    pepper: e.KEYGATE_PEPPER,
    adminTokens: e.KEYGATE_ADMIN_TOKENS,
    adminTokensFile: e.KEYGATE_ADMIN_TOKENS_FILE,
    keyPrefix: e.KEYGATE_KEY_PREFIX,
    host: e.KEYGATE_HOST,
    grpcPort: e.KEYGATE_GRPC_PORT,
    grpcEngine: e.KEYGATE_GRPC_ENGINE,
    httpAuthzPort: e.KEYGATE_HTTP_AUTHZ_PORT,
    httpAuthzProxy: e.KEYGATE_HTTP_AUTHZ_PROXY,
    adminPort: e.KEYGATE_ADMIN_PORT,
    logLevel: e.KEYGATE_LOG_LEVEL,
    shutdownGraceSeconds: e.KEYGATE_SHUTDOWN_GRACE_SECONDS,
    checkBudgetMs: e.KEYGATE_CHECK_BUDGET_MS,
    gcThreadNice: e.KEYGATE_GC_THREAD_NICE,
    shutdownDelaySeconds: e.KEYGATE_SHUTDOWN_DELAY_SECONDS,
    startupWaitSeconds: e.KEYGATE_STARTUP_WAIT_SECONDS,
    adminMaxBodyBytes: e.KEYGATE_ADMIN_MAX_BODY_BYTES,
    listeners: {
      headersTimeoutMs: Math.round(e.KEYGATE_HEADERS_TIMEOUT_SECONDS * 1000),
      requestTimeoutMs: Math.round(e.KEYGATE_REQUEST_TIMEOUT_SECONDS * 1000),
      idleTimeoutMs: Math.round(e.KEYGATE_IDLE_TIMEOUT_SECONDS * 1000),
      maxConnections: e.KEYGATE_MAX_CONNECTIONS ?? null,
    },
    tracing: tracingSettings(e),
    accessLogSampleRate: e.KEYGATE_ACCESS_LOG_SAMPLE,
    policy,
    tls,
    redisTls,
  };
}

/** The KEYGATE_* variables the CLI's client subcommands read (src/cli.ts): a shell that runs both sets them for serve too. */
const CLI_VARIABLES = ["KEYGATE_URL", "KEYGATE_ADMIN_TOKEN"];

/** Every KEYGATE_* variable keygate reads, serve's and the CLI's. */
const KNOWN_VARIABLES: readonly string[] = [...Object.keys(envSchema.shape).filter((name) => name.startsWith("KEYGATE_")), ...CLI_VARIABLES];

// The service links Kubernetes injects for a Service named keygate or keygate-<name> (KEYGATE_SERVICE_HOST,
// KEYGATE_SERVICE_PORT and KEYGATE_SERVICE_PORT_<port name>, KEYGATE_PORT_8080_TCP and its _PROTO,
// _PORT and _ADDR), which Docker links share. A bare <prefix>_PORT is one only with its
// proto://host:port value: a misspelled port variable holds a number.
const SERVICE_LINK_NAME = /_(?:SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9_]+)?|PORT_[0-9]+_(?:TCP|UDP|SCTP)(?:_(?:PROTO|PORT|ADDR))?)$/;
const SERVICE_LINK_PORT = /^(?:tcp|udp|sctp):\/\//;

/** The most edits (inserted, deleted or changed letters) between a misspelling and the name it was meant to be. */
const MAX_SPELLING_EDITS = 2;

/**
 * A port variable keygate reads whose value is a Kubernetes or Docker service link's
 * (tcp://host:port), as a Service named keygate-admin, keygate-grpc or keygate-http-authz sets
 * in every pod of its namespace: a port given that way was never meant, and keygate's default
 * stands (the pod would otherwise fail to start once the Service exists).
 */
function linkedPortVariable(name: string, value: string): boolean {
  return KNOWN_VARIABLES.includes(name) && name.endsWith("_PORT") && SERVICE_LINK_VALUE.test(value);
}
const SERVICE_LINK_VALUE = /^(?:tcp|udp|sctp):\/\/[^\s/]+:[0-9]+$/;

/** A KEYGATE_* variable keygate does not read, and the known name it is likely meant to be. */
export interface IgnoredVariable {
  name: string;
  /** The closest known name, when one is close; null when none is. */
  closest: string | null;
  /** A port variable keygate reads, holding a service link's value (linkedPortVariable). */
  serviceLink?: true;
}

/**
 * The KEYGATE_* variables in `env` (any letter case) that keygate does not read, sorted by name,
 * leaving out Kubernetes and Docker service links. Only names: their values may be secrets.
 */
export function ignoredVariables(env: NodeJS.ProcessEnv): IgnoredVariable[] {
  const ignored: IgnoredVariable[] = [];
  for (const [name, value = ""] of Object.entries(env)) {
    if (linkedPortVariable(name, value)) ignored.push({ name, closest: null, serviceLink: true });
    else if (name.toUpperCase().startsWith("KEYGATE_") && !KNOWN_VARIABLES.includes(name) && !isServiceLink(name, value)) {
      ignored.push({ name, closest: closestKnownVariable(name.toUpperCase()) });
    }
  }
  return ignored.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
}

function isServiceLink(name: string, value: string): boolean {
  return SERVICE_LINK_NAME.test(name) || (name.endsWith("_PORT") && SERVICE_LINK_PORT.test(value));
}

/**
 * The known name a few edits away (the fewest wins), else the longest known name that starts it
 * (KEYGATE_CONFIG for KEYGATE_CONFIG_FILE), else the one known name it starts (KEYGATE_TLS_CERT_FILE
 * for KEYGATE_TLS_CERT); null when none.
 */
function closestKnownVariable(name: string): string | null {
  let closest: string | null = null;
  let fewest = MAX_SPELLING_EDITS + 1;
  for (const known of KNOWN_VARIABLES) {
    const edits = editDistance(name, known, fewest);
    if (edits < fewest) [closest, fewest] = [known, edits];
  }
  if (closest !== null) return closest;
  const within = KNOWN_VARIABLES.filter((known) => name.startsWith(`${known}_`)).sort((a, b) => b.length - a.length);
  if (within[0] !== undefined) return within[0];
  const extended = KNOWN_VARIABLES.filter((known) => known.startsWith(`${name}_`));
  return extended.length === 1 ? (extended[0] ?? null) : null;
}

/** Levenshtein distance between a and b, or `cap` once it cannot be less than that. */
function editDistance(a: string, b: string, cap: number): number {
  if (Math.abs(a.length - b.length) >= cap) return cap;
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const current = [i];
    for (let j = 1; j <= b.length; j++) {
      const change = (previous[j - 1] ?? 0) + (a[i - 1] === b[j - 1] ? 0 : 1);
      current.push(Math.min(change, (previous[j] ?? 0) + 1, (current[j - 1] ?? 0) + 1));
    }
    if (Math.min(...current) >= cap) return cap;
    previous = current;
  }
  return Math.min(previous[b.length] ?? cap, cap);
}

type Env = z.infer<typeof envSchema>;

/** The listeners' TLS settings; a half-given pair or a setting with nothing to act on is an error naming it. */
function tlsSettings(e: Env): TlsSettings | null {
  const cert = e.KEYGATE_TLS_CERT_FILE;
  const key = e.KEYGATE_TLS_KEY_FILE;
  if (cert === undefined && key === undefined) {
    const orphan = (["KEYGATE_TLS_CLIENT_CA_FILE", "KEYGATE_TLS_LISTENERS", "KEYGATE_TLS_CLIENT_AUTH_LISTENERS"] as const).find((name) => e[name] !== undefined);
    if (orphan !== undefined) throw new ConfigError(`invalid environment: ${orphan}: needs KEYGATE_TLS_CERT_FILE and KEYGATE_TLS_KEY_FILE (the listeners' certificate and key)`);
    return null;
  }
  if (cert === undefined) throw new ConfigError("invalid environment: KEYGATE_TLS_CERT_FILE: must be set with KEYGATE_TLS_KEY_FILE (the certificate of that key)");
  if (key === undefined) throw new ConfigError("invalid environment: KEYGATE_TLS_KEY_FILE: must be set with KEYGATE_TLS_CERT_FILE (the private key of that certificate)");
  const listeners = new Set(e.KEYGATE_TLS_LISTENERS ?? LISTENER_NAMES);
  const ca = e.KEYGATE_TLS_CLIENT_CA_FILE;
  if (ca === undefined && e.KEYGATE_TLS_CLIENT_AUTH_LISTENERS !== undefined) {
    throw new ConfigError("invalid environment: KEYGATE_TLS_CLIENT_AUTH_LISTENERS: needs KEYGATE_TLS_CLIENT_CA_FILE (the CA client certificates are checked against)");
  }
  const clientAuth = new Set(ca === undefined ? [] : (e.KEYGATE_TLS_CLIENT_AUTH_LISTENERS ?? [...listeners]));
  const plaintext = [...clientAuth].filter((name) => !listeners.has(name));
  if (plaintext.length > 0) {
    throw new ConfigError(`invalid environment: KEYGATE_TLS_CLIENT_AUTH_LISTENERS: ${plaintext.join(", ")} ${plaintext.length === 1 ? "is" : "are"} not in KEYGATE_TLS_LISTENERS (client certificates need TLS)`);
  }
  return { certFile: cert, keyFile: key, clientCaFile: ca, listeners, clientAuthListeners: clientAuth };
}

/** Redis TLS options; each needs a rediss:// URL, and a client certificate needs its key. */
function redisTlsSettings(e: Env): RedisTlsSettings | null {
  const { KEYGATE_REDIS_TLS_CA_FILE: caFile, KEYGATE_REDIS_TLS_CERT_FILE: certFile, KEYGATE_REDIS_TLS_KEY_FILE: keyFile } = e;
  if (caFile === undefined && certFile === undefined && keyFile === undefined) return null;
  const named = caFile !== undefined ? "KEYGATE_REDIS_TLS_CA_FILE" : certFile !== undefined ? "KEYGATE_REDIS_TLS_CERT_FILE" : "KEYGATE_REDIS_TLS_KEY_FILE";
  const redis = e.KEYGATE_REDIS_URL;
  const redisUsesTls = redis !== undefined && (redis.kind === "standalone" ? redis.url.startsWith("rediss://") : redis.tls);
  if (!redisUsesTls) {
    throw new ConfigError(`invalid environment: ${named}: needs KEYGATE_REDIS_URL to start with rediss://, rediss+cluster:// or rediss+sentinel:// (TLS)`);
  }
  if ((certFile === undefined) !== (keyFile === undefined)) {
    throw new ConfigError(`invalid environment: ${certFile === undefined ? "KEYGATE_REDIS_TLS_CERT_FILE: must be set with KEYGATE_REDIS_TLS_KEY_FILE" : "KEYGATE_REDIS_TLS_KEY_FILE: must be set with KEYGATE_REDIS_TLS_CERT_FILE"}`);
  }
  return { caFile, certFile, keyFile };
}
