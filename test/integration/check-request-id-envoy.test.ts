import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { CheckResponse } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// Envoy's ext_authz (source/extensions/filters/common/ext_authz/check_request_utils.cc) fills
// AttributeContext.HttpRequest.id with its stream id, a random uint64 drawn for the stream. It is
// not the request id: x-request-id (a UUID Envoy generates, or keeps, before the filter chain runs)
// is what Envoy forwards to the API and logs, and it reaches keygate in the headers map. A denial
// and keygate's logs name that one, so the three can be matched.

let kg: TestKeygate;
beforeAll(async () => {
  kg = await startKeygate();
});
afterAll(async () => {
  await kg.stop();
});

function requestIdOf(response: CheckResponse): string {
  if (response.httpResponse.case !== "deniedResponse") throw new Error(`expected a denial, got ${response.httpResponse.case ?? "nothing"}`);
  const body = JSON.parse(response.httpResponse.value.body) as { requestId?: unknown };
  if (typeof body.requestId !== "string") throw new Error("denial body without requestId");
  return body.requestId;
}

describe("gRPC Check request id as Envoy sends it", () => {
  it("a denial names the x-request-id Envoy forwards and logs, not Envoy's internal stream id", async () => {
    const envoyRequestId = "3c9a1f2e-7b4d-4e8a-9f10-2d6c5b8e1a47";
    const streamId = "13835058055282163712"; // what Envoy puts in HttpRequest.id: a random uint64
    const response = await kg.check({
      attributes: {
        request: {
          http: {
            id: streamId,
            method: "GET",
            path: "/v1/things",
            host: "api.example.com",
            scheme: "http",
            protocol: "HTTP/1.1",
            size: 0n,
            headers: { ":authority": "api.example.com", ":path": "/v1/things", ":method": "GET", ":scheme": "http", "x-request-id": envoyRequestId },
          },
        },
      },
    });
    // It was "13835058055282163712", an id found in no Envoy log, no app log and no response header.
    expect(requestIdOf(response)).toBe(envoyRequestId);
  });
});
