import { existsSync } from "node:fs";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { z } from "zod";
import { KEYGATE_NODE_FLAGS } from "../src/server/node-flags.js";
import { spawnTracked, waitForJsonLine } from "./processes.js";
import type { TrackedChild } from "./processes.js";

const root = resolve(import.meta.dirname, "..");
// Children run in other directories, so the TypeScript loader is named by absolute URL.
const tsxLoader = pathToFileURL(join(root, "node_modules/tsx/dist/loader.mjs")).href;
const START_TIMEOUT_MS = 60_000;

/** How keygate is run: the built JavaScript (as `npm start` does) or the sources through tsx. */
export type KeygateBuild = "dist" | "source";

/** A server the load generator drives. */
export interface Target {
  readonly label: string;
  readonly grpcPort: number;
  /** keygate's admin port (for /metrics); null for the no-op server. */
  readonly adminPort: number | null;
  readonly process: TrackedChild;
  /**
   * Backend servers whose CPU is measured with the target's (Redis, the MongoDB-wire server); a
   * Java one names the GC log its stop-the-world pauses are read from (jvmGcLogOption).
   */
  readonly companions?: ReadonlyArray<{ name: string; pid: number; gcLog?: string }>;
  /** The malloc keygate said it runs on ("keygate listening"'s allocator); absent for the no-op servers. */
  readonly allocator?: string;
  stop(): Promise<void>;
}

/** How to start keygate. */
export interface KeygateLaunch {
  node: string;
  build: KeygateBuild;
  cwd: string;
  /** Exactly the KEYGATE_* variables the child gets. */
  env: Record<string, string>;
  /** Extra node flags, e.g. --cpu-prof. */
  nodeArgs?: readonly string[];
  /** A malloc library to preload (LD_PRELOAD), as the image preloads jemalloc; null: the system's; absent: as inherited. */
  preload?: string | null;
}

const keygateListening = z.object({ msg: z.literal("keygate listening"), grpcPort: z.number(), adminPort: z.number(), allocator: z.string().default("not reported") });
const noopListening = z.object({ msg: z.literal("noop listening"), grpcPort: z.number() });

/** The entry file of keygate for a build. */
export function keygateEntry(build: KeygateBuild): string[] {
  return build === "dist" ? [join(root, "dist/cli.js")] : ["--import", tsxLoader, join(root, "src/cli.ts")];
}

/** True when `npm run build` output is present. */
export function distBuilt(): boolean {
  return existsSync(join(root, "dist/cli.js"));
}

async function stopGracefully(child: TrackedChild, label: string): Promise<void> {
  const code = await child.stop("SIGTERM");
  if (code !== 0) process.stderr.write(`bench: ${label} exited with ${String(code)} on SIGTERM:\n${child.output().slice(-2000)}\n`);
}

/** Starts `keygate serve` on 127.0.0.1 with ephemeral ports and waits until it listens. */
export async function startKeygate(label: string, launch: KeygateLaunch): Promise<Target> {
  const env: Record<string, string> = { KEYGATE_HOST: "127.0.0.1", KEYGATE_GRPC_PORT: "0", KEYGATE_HTTP_AUTHZ_PORT: "0", KEYGATE_ADMIN_PORT: "0", ...launch.env };
  // null clears a preload the bench itself was started with: the system's malloc, as asked.
  if (launch.preload !== undefined) env["LD_PRELOAD"] = launch.preload ?? "";
  // keygate runs with the flags it ships with (npm start, the image), then the run's own.
  const args = [...KEYGATE_NODE_FLAGS, ...(launch.nodeArgs ?? []), ...keygateEntry(launch.build), "serve"];
  const child = spawnTracked(label, launch.node, args, { cwd: launch.cwd, env, role: "server" });
  try {
    const ready = await waitForJsonLine(child, keygateListening, START_TIMEOUT_MS);
    return { label, grpcPort: ready.grpcPort, adminPort: ready.adminPort, allocator: ready.allocator, process: child, stop: () => stopGracefully(child, label) };
  } catch (error) {
    await child.stop("SIGKILL");
    throw error;
  }
}

/** The two no-op Check servers: the raw `node:http2` one is the ceiling every ratio is taken against. */
export const NOOPS = {
  "noop-h2": "bench/noop-h2-server.ts",
  "noop-grpc-js": "bench/noop-server.ts",
} as const;
/** A no-op server's target name. */
export type NoopName = keyof typeof NOOPS;
/** Both no-ops, in the order they run: the ceiling first. */
export const NOOP_NAMES: readonly NoopName[] = ["noop-h2", "noop-grpc-js"];
/** The target every ratio is taken against. */
export const CEILING: NoopName = "noop-h2";

/**
 * Starts a no-op Check server (bench/noop-h2-server.ts or bench/noop-server.ts) as its own
 * process, with `nodeArgs` (e.g. --cpu-prof) before its script.
 */
export async function startNoop(node: string, name: NoopName, nodeArgs: readonly string[] = []): Promise<Target> {
  const child = spawnTracked(name, node, [...nodeArgs, "--import", tsxLoader, join(root, NOOPS[name])], { cwd: root, env: {}, role: "server" });
  try {
    const ready = await waitForJsonLine(child, noopListening, START_TIMEOUT_MS);
    return { label: name, grpcPort: ready.grpcPort, adminPort: null, process: child, stop: () => stopGracefully(child, name) };
  } catch (error) {
    await child.stop("SIGKILL");
    throw error;
  }
}
