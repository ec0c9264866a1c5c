/**
 * The grpc-js no-op (the raw `node:http2` one, bench/noop-h2-server.ts, is the ceiling): a grpc-js
 * Authorization/Check server with keygate's own grpc-js server options that
 * decodes each request as envoy.service.auth.v3.CheckRequest (proto/envoy's subset: the
 * request line, time, host, scheme, protocol and headers; keygate decodes only the fields it
 * reads, keygate.authz.v1.CheckRequestView) and answers every Check with one fixed OK, encoded
 * once. Run as its own process so that its CPU is accounted apart from keygate's; it
 * prints one JSON line with its port, then serves until SIGTERM.
 */
import { create, toBinary } from "@bufbuild/protobuf";
import { Server, ServerCredentials } from "@grpc/grpc-js";
import type { sendUnaryData, ServerUnaryCall } from "@grpc/grpc-js";
import { CheckResponseSchema } from "../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import type { CheckRequest } from "../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { authorizationDefinition, authorizationServerDefinition, GRPC_SERVER_OPTIONS } from "../src/server/grpc-authz.js";

const definition = {
  Check: {
    ...authorizationServerDefinition.Check,
    requestSerialize: authorizationDefinition.Check.requestSerialize,
    requestDeserialize: authorizationDefinition.Check.requestDeserialize,
  },
};

const OK = toBinary(
  CheckResponseSchema,
  create(CheckResponseSchema, {
    status: { code: 0 },
    httpResponse: { case: "okResponse", value: {} },
  }),
);

function check(_call: ServerUnaryCall<CheckRequest, Uint8Array>, callback: sendUnaryData<Uint8Array>): void {
  callback(null, OK);
}

async function main(): Promise<void> {
  const server = new Server(GRPC_SERVER_OPTIONS);
  server.addService(definition, { Check: check });
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
