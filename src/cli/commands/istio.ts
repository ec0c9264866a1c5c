import { readFileSync } from "node:fs";
import { InvalidArgumentError, Option } from "commander";
import type { Command } from "commander";
import { DEFAULT_PROVIDER, mergeMeshConfig } from "../../deploy/istio-mesh.js";
import type { MeshConfigFormat } from "../../deploy/istio-mesh.js";
import { CliFailure } from "../errors.js";

const EXIT_USAGE = 2;

function port(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1 || n > 65535) throw new InvalidArgumentError("a port from 1 to 65535");
  return n;
}

function duration(value: string): string {
  if (!/^\d+(\.\d+)?(ms|s|m)$/.test(value)) throw new InvalidArgumentError('an Istio duration such as "0.25s" or "250ms"');
  return value;
}

/**
 * `keygate istio mesh-config`: merges keygate's ext_authz provider into an existing Istio mesh
 * configuration (the istio ConfigMap's `mesh`, istiod's Helm values, or an IstioOperator) and
 * prints it, so registering keygate never resets the rest of the mesh.
 */
export function registerIstio(program: Command): void {
  const istio = program.command("istio").description("Istio integration helpers (no keygate server needed)");
  istio
    .command("mesh-config")
    .description("print FILE (or stdin) with keygate's ext_authz provider merged in; other providers and settings are kept")
    .argument("[file]", "the current mesh config; - or absent: stdin")
    .addOption(
      new Option("--format <format>", "what the file is: mesh (the istio ConfigMap's mesh key), helm (istiod's values), operator (an IstioOperator)")
        .choices(["mesh", "helm", "operator"])
        .default("mesh"),
    )
    .option("--name <name>", "the provider's name, as AuthorizationPolicies reference it", DEFAULT_PROVIDER.name)
    .option("--service <host>", "keygate's gRPC Check Service", DEFAULT_PROVIDER.service)
    .option("--port <port>", "keygate's gRPC Check port", port, DEFAULT_PROVIDER.port)
    .option("--timeout <duration>", "the sidecar's ext_authz timeout; keep it above KEYGATE_CHECK_BUDGET_MS", duration, DEFAULT_PROVIDER.timeout)
    .action((file: string | undefined, options: { format: MeshConfigFormat; name: string; service: string; port: number; timeout: string }) => {
      let text: string;
      try {
        text = readFileSync(file === undefined || file === "-" ? 0 : file, "utf8");
      } catch (error) {
        throw new CliFailure(`cannot read ${file ?? "stdin"}: ${error instanceof Error ? error.message : String(error)}`, EXIT_USAGE);
      }
      let merged;
      try {
        merged = mergeMeshConfig(text, options.format, { name: options.name, service: options.service, port: options.port, timeout: options.timeout });
      } catch (error) {
        throw new CliFailure(`${file ?? "stdin"}: ${error instanceof Error ? error.message : String(error)}`, EXIT_USAGE);
      }
      for (const note of merged.notes) process.stderr.write(`keygate: ${note}\n`);
      process.stdout.write(merged.yaml);
    });
}
