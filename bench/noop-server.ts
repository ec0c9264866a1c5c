/**
 * The ceiling: a grpc-js Authorization/Check server that decodes each CheckRequest with the same
 * protobuf-es schema keygate uses and answers a fixed OK. Run as its own process so that its CPU
 * is accounted apart from keygate's; it prints one JSON line with its port, then serves until
 * SIGTERM.
 */
import { create } from "@bufbuild/protobuf";
import { Server, ServerCredentials } from "@grpc/grpc-js";
import type { sendUnaryData, ServerUnaryCall } from "@grpc/grpc-js";
import { CheckResponseSchema } from "../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import type { CheckRequest, CheckResponse } from "../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { authorizationDefinition } from "../src/server/grpc-authz.js";

const OK: CheckResponse = create(CheckResponseSchema, {
  status: { code: 0 },
  httpResponse: { case: "okResponse", value: {} },
});

function check(_call: ServerUnaryCall<CheckRequest, CheckResponse>, callback: sendUnaryData<CheckResponse>): void {
  callback(null, OK);
}

async function main(): Promise<void> {
  const server = new Server({ "grpc.keepalive_permit_without_calls": 1 });
  server.addService(authorizationDefinition, { Check: check });
  const port = await new Promise<number>((resolve, reject) => {
    server.bindAsync("127.0.0.1:0", ServerCredentials.createInsecure(), (error, bound) => (error ? reject(error) : resolve(bound)));
  });
  process.stdout.write(`${JSON.stringify({ msg: "noop listening", grpcPort: port })}\n`);
  const stop = (): void => {
    server.tryShutdown(() => process.exit(0));
    setTimeout(() => process.exit(0), 2000).unref();
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

await main();
