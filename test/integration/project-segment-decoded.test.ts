import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { CheckResponse } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { TEST_POLICY, checkInit, httpCheck, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// A {project} route compared the key's project with the path segment still percent-encoded
// ("team%3Aa"), but every upstream router decodes a path parameter ("team:a"). Project ids are any
// printable ASCII, so a key locked to "team%3Aa" passed on a path the upstream serves as project
// "team:a", another project; and a key locked to "team:a" was refused its own project's path when
// the client escaped the ":". The segment is now compared decoded.

let kg: TestKeygate;
beforeAll(async () => {
  kg = await startKeygate({ policy: { ...TEST_POLICY, routes: [{ method: "*", pathPrefix: "/projects/{project}/jobs" }] } });
});
afterAll(async () => {
  await kg.stop();
});

function outcome(response: CheckResponse): { status: number; project?: string } {
  if (response.httpResponse.case === "okResponse") {
    const headers = Object.fromEntries(response.httpResponse.value.headers.map((h) => [h.header?.key ?? "", h.header?.value ?? ""]));
    return { status: 200, project: headers["x-keygate-project-id"] ?? "" };
  }
  if (response.httpResponse.case !== "deniedResponse") throw new Error("no answer");
  return { status: response.httpResponse.value.status?.code ?? 0 };
}

describe("{project} segments are compared as the upstream decodes them", () => {
  it("security: a key locked to 'team%3Aa' is refused on the path the upstream reads as project 'team:a'", async () => {
    await kg.admin.upsertAccount({ ownerId: "escaped-project", plan: "business" });
    const created = await kg.admin.createKey({ ownerId: "escaped-project", name: "p", projectId: "team%3Aa" });
    const grpc = outcome(await kg.check(checkInit({ "x-api-key": created.secret }, "/projects/team%3Aa/jobs")));
    const http = await httpCheck(kg.ports.http, "/check/projects/team%3Aa/jobs", { "x-api-key": created.secret });
    expect({ grpc, http: http.status }).toEqual({ grpc: { status: 403 }, http: 403 });
  });

  it("happy: a key locked to 'team:a' passes on its project's path, the ':' escaped or not", async () => {
    await kg.admin.upsertAccount({ ownerId: "escaped-project-2", plan: "business" });
    const created = await kg.admin.createKey({ ownerId: "escaped-project-2", name: "p", projectId: "team:a" });
    const escaped = outcome(await kg.check(checkInit({ "x-api-key": created.secret }, "/projects/team%3Aa/jobs")));
    const plain = outcome(await kg.check(checkInit({ "x-api-key": created.secret }, "/projects/team:a/jobs")));
    const http = await httpCheck(kg.ports.http, "/check/projects/team%3Aa/jobs", { "x-api-key": created.secret });
    expect({ escaped, plain, http: http.status }).toEqual({ escaped: { status: 200, project: "team:a" }, plain: { status: 200, project: "team:a" }, http: 200 });
  });
});
