import { execFile } from "node:child_process";
import { request as httpsRequest } from "node:https";
import { connect as tlsConnect } from "node:tls";
import { create } from "@bufbuild/protobuf";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { Client as GrpcClient, credentials } from "@grpc/grpc-js";
import type { ServiceError } from "@grpc/grpc-js";
import { CheckRequestSchema } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import type { CheckRequest, CheckResponse } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { authorizationDefinition } from "../../src/server/grpc-authz.js";

/** PEM bytes a TLS client trusts and, for mTLS, presents. */
export interface ClientTls {
  ca: Buffer;
  cert?: Buffer;
  key?: Buffer;
}

/** A grpc-js Check client over TLS (credentials.createSsl), as Envoy's gRPC ext_authz would connect. */
export function grpcTlsCheckClient(port: number, tls: ClientTls): { check(init: MessageInitShape<typeof CheckRequestSchema>): Promise<CheckResponse>; close(): void } {
  // The certificate names localhost; naming it avoids sending an IP address as SNI (RFC 6066).
  const client = new GrpcClient(`127.0.0.1:${port}`, credentials.createSsl(tls.ca, tls.key ?? null, tls.cert ?? null), {
    "grpc.ssl_target_name_override": "localhost",
    "grpc.default_authority": "localhost",
  });
  const def = authorizationDefinition.Check;
  return {
    check: (init) =>
      new Promise((resolve, reject) => {
        const request: CheckRequest = create(CheckRequestSchema, init);
        client.makeUnaryRequest<CheckRequest, CheckResponse>(def.path, def.requestSerialize, def.responseDeserialize, request, { deadline: Date.now() + 10_000 }, (error: ServiceError | null, response?: CheckResponse) => {
          if (error !== null) reject(error);
          else if (response === undefined) reject(new Error("empty Check response"));
          else resolve(response);
        });
      }),
    close: () => client.close(),
  };
}

/** One HTTPS request to 127.0.0.1 with the given trust and client certificate; the status and body. */
export function httpsCall(
  port: number,
  path: string,
  tls: ClientTls,
  options: { method?: string; headers?: Record<string, string>; body?: string } = {},
): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = httpsRequest(
      { host: "127.0.0.1", servername: "localhost", port, path, method: options.method ?? "GET", headers: options.headers, ca: tls.ca, cert: tls.cert, key: tls.key, agent: false },
      (res) => {
        let body = "";
        res.setEncoding("utf8");
        res.on("data", (chunk: string) => (body += chunk));
        res.on("end", () => resolve({ status: res.statusCode ?? 0, body }));
        res.on("error", reject);
      },
    );
    req.setTimeout(10_000, () => req.destroy(new Error("timed out")));
    req.on("error", reject);
    req.end(options.body);
  });
}

/** The SHA-256 fingerprint of the certificate a listener serves to a new connection. */
export function servedFingerprint(port: number, tls: ClientTls, alpn: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = tlsConnect({ host: "127.0.0.1", servername: "localhost", port, ca: tls.ca, cert: tls.cert, key: tls.key, ALPNProtocols: alpn }, () => {
      const fingerprint = socket.getPeerCertificate().fingerprint256;
      socket.destroy();
      resolve(fingerprint);
    });
    socket.setTimeout(10_000, () => socket.destroy(new Error("timed out")));
    socket.once("error", reject);
  });
}

/** curl's exit code, the HTTP status it printed (000 when none) and the body. */
export interface CurlResult {
  exitCode: number;
  status: string;
  body: string;
}

/** Runs curl with these arguments plus `-sS -w` for the status; never `-v`, which could show headers with secrets. */
export function curl(args: readonly string[]): Promise<CurlResult> {
  return new Promise((resolve) => {
    execFile("curl", ["-sS", "--max-time", "15", "-w", "\n%{http_code}", ...args], { encoding: "utf8" }, (error, stdout) => {
      const exitCode = error === null ? 0 : typeof error.code === "number" ? error.code : -1;
      const cut = stdout.lastIndexOf("\n");
      resolve({ exitCode, status: stdout.slice(cut + 1), body: stdout.slice(0, Math.max(cut, 0)) });
    });
  });
}

/** A listener's keygate_tls_handshake_failures_total, read from the admin port's /metrics. */
export async function handshakeFailures(adminPort: number, tls: ClientTls, listener: "grpc" | "http" | "admin"): Promise<number> {
  const text = (await httpsCall(adminPort, "/metrics", tls)).body;
  return Number(new RegExp(`^keygate_tls_handshake_failures_total\\{listener="${listener}"\\} (\\S+)$`, "m").exec(text)?.[1] ?? "NaN");
}
