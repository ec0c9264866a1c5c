import { readFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { describe, expect, it } from "vitest";
import { parse } from "yaml";
import { z } from "zod";

// The TLS variants shipped as commented blocks stay valid when uncommented: Envoy's cluster
// transport socket, and the Istio DestinationRule. (nginx's and Caddy's TLS variants are run
// for real by test/e2e/proxies-tls.test.ts.)

const DEPLOY = resolve(import.meta.dirname, "../../deploy");

/** The commented `transport_socket:` block of envoy.yaml, uncommented, at its indentation. */
function envoyTransportSocket(): unknown {
  const lines = readFileSync(join(DEPLOY, "envoy/envoy.yaml"), "utf8").split("\n");
  const start = lines.findIndex((line) => /^\s*# transport_socket:$/.test(line));
  expect(start).toBeGreaterThan(0);
  const indent = (lines[start] ?? "").indexOf("#");
  const block: string[] = [];
  for (const line of lines.slice(start)) {
    if (!line.startsWith(`${" ".repeat(indent)}# `) && line.trim() !== "#") break;
    block.push(line.slice(indent + 2));
  }
  return parse(block.join("\n"));
}

const fileSource = z.object({ filename: z.string().startsWith("/") }).strict();

describe("Envoy's TLS block for the keygate cluster", () => {
  it("parses as an UpstreamTlsContext that offers h2, trusts a CA file, checks the name and presents a client certificate", () => {
    const socket = z
      .object({
        transport_socket: z.object({
          name: z.literal("envoy.transport_sockets.tls"),
          typed_config: z
            .object({
              "@type": z.literal("type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"),
              sni: z.string(),
              common_tls_context: z
                .object({
                  alpn_protocols: z.array(z.string()),
                  validation_context: z
                    .object({
                      trusted_ca: fileSource,
                      match_typed_subject_alt_names: z.array(z.object({ san_type: z.literal("DNS"), matcher: z.object({ exact: z.string() }) })),
                    })
                    .strict(),
                  tls_certificates: z.array(z.object({ certificate_chain: fileSource, private_key: fileSource }).strict()),
                })
                .strict(),
            })
            .strict(),
        }),
      })
      .parse(envoyTransportSocket()).transport_socket.typed_config;
    expect(socket.common_tls_context.alpn_protocols).toEqual(["h2"]);
    expect(socket.common_tls_context.validation_context.match_typed_subject_alt_names.map((m) => m.matcher.exact)).toEqual([socket.sni]);
    expect(socket.common_tls_context.tls_certificates).toHaveLength(1);
  });
});

describe("Istio's DestinationRule for TLS to keygate", () => {
  it("originates TLS on the gRPC port of the Service the mesh config names", () => {
    const rule = z
      .object({
        kind: z.literal("DestinationRule"),
        spec: z.object({
          host: z.string(),
          trafficPolicy: z.object({
            portLevelSettings: z.array(
              z.object({
                port: z.object({ number: z.number() }),
                tls: z.object({ mode: z.enum(["SIMPLE", "MUTUAL"]), sni: z.string(), subjectAltNames: z.array(z.string()), caCertificates: z.string() }).passthrough(),
              }),
            ),
          }),
        }),
      })
      .parse(parse(readFileSync(join(DEPLOY, "istio/destination-rule-tls.yaml"), "utf8")));
    const mesh = readFileSync(join(DEPLOY, "istio/mesh-config.yaml"), "utf8");
    const provider = z
      .object({ spec: z.object({ meshConfig: z.object({ extensionProviders: z.array(z.object({ envoyExtAuthzGrpc: z.object({ service: z.string(), port: z.number() }) })) }) }) })
      .parse(parse(mesh)).spec.meshConfig.extensionProviders[0]?.envoyExtAuthzGrpc;
    expect(rule.spec.host).toBe(provider?.service);
    expect(rule.spec.trafficPolicy.portLevelSettings.map((p) => p.port.number)).toEqual([provider?.port]);
    expect(rule.spec.trafficPolicy.portLevelSettings[0]?.tls.subjectAltNames).toEqual([rule.spec.trafficPolicy.portLevelSettings[0]?.tls.sni]);
  });
});
