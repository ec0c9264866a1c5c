import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { CheckResponse } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { TEST_POLICY, checkInit, httpCheck, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// A route pattern with a {project} segment gives the project a locked key must match, in both
// entry points: before this, a key locked to proj_a reached /projects/proj_b/jobs.
let kg: TestKeygate;
beforeAll(async () => {
  kg = await startKeygate({ policy: { ...TEST_POLICY, routes: [...TEST_POLICY.routes, { method: "*", pathPrefix: "/projects/{project}/jobs" }] } });
});
afterAll(async () => {
  await kg.stop();
});

async function key(ownerId: string, projectId: string): Promise<{ id: string; secret: string }> {
  await kg.admin.upsertAccount({ ownerId, plan: "business" });
  const created = await kg.admin.createKey({ ownerId, name: "project", projectId });
  return { id: created.key?.id ?? "", secret: created.secret };
}

function outcome(response: CheckResponse): { status: number; code: string; project?: string } {
  if (response.httpResponse.case === "okResponse") {
    const headers = Object.fromEntries(response.httpResponse.value.headers.map((h) => [h.header?.key ?? "", h.header?.value ?? ""]));
    return { status: 200, code: "OK", project: headers["x-keygate-project-id"] ?? "" };
  }
  if (response.httpResponse.case !== "deniedResponse") throw new Error("no answer");
  const { error } = JSON.parse(response.httpResponse.value.body) as { error: { code: string } };
  return { status: response.httpResponse.value.status?.code ?? 0, code: error.code };
}

describe("project from the path happy", () => {
  it("a locked key is allowed on its own project's path and told the project, over gRPC and HTTP", async () => {
    const locked = await key("path-project-a", "proj_a");
    expect(outcome(await kg.check(checkInit({ "x-api-key": locked.secret }, "/projects/proj_a/jobs/7")))).toEqual({ status: 200, code: "OK", project: "proj_a" });
    const http = await httpCheck(kg.ports.http, "/check/projects/proj_a/jobs", { "x-api-key": locked.secret });
    expect([http.status, http.headers.get("x-keygate-project-id")]).toEqual([200, "proj_a"]);
  });

  it("an unlocked key reaches every project", async () => {
    const unlocked = await key("path-project-any", "");
    expect(outcome(await kg.check(checkInit({ "x-api-key": unlocked.secret }, "/projects/proj_b/jobs")))).toEqual({ status: 200, code: "OK", project: "" });
    expect((await httpCheck(kg.ports.http, "/check/projects/proj_b/jobs", { "x-api-key": unlocked.secret })).status).toBe(200);
  });

  it("ListKeys by project lists that project's keys only", async () => {
    const ownerId = "path-project-list";
    await kg.admin.upsertAccount({ ownerId, plan: "business" });
    const a = await kg.admin.createKey({ ownerId, name: "a", projectId: "proj_a" });
    await kg.admin.createKey({ ownerId, name: "b", projectId: "proj_b" });
    await kg.admin.createKey({ ownerId, name: "none" });
    const listed = await kg.admin.listKeys({ ownerId, projectId: "proj_a" });
    expect(listed.keys.map((k) => [k.id, k.projectId])).toEqual([[a.key?.id, "proj_a"]]);
  });
});

describe("project from the path security", () => {
  it("a key locked to proj_a is refused 403 on proj_b's path, over gRPC and HTTP", async () => {
    const locked = await key("path-project-b", "proj_a");
    expect(outcome(await kg.check(checkInit({ "x-api-key": locked.secret }, "/projects/proj_b/jobs")))).toEqual({ status: 403, code: "FORBIDDEN" });
    const http = await httpCheck(kg.ports.http, "/check/projects/proj_b/jobs", { "x-api-key": locked.secret });
    expect(http.status).toBe(403);
    expect(JSON.parse(http.body).error.message).toBe("This API key is locked to another project.");
  });

  it("a path that escapes or dot-segments its way into another project is refused 400, never read as the key's project", async () => {
    const locked = await key("path-project-c", "proj_a");
    for (const path of ["/projects/proj_a%2F..%2Fproj_b/jobs", "/projects/proj_a/../proj_b/jobs", "/projects/proj_a%2Fjobs", "/projects//jobs"]) {
      expect(outcome(await kg.check(checkInit({ "x-api-key": locked.secret }, path))), path).toMatchObject({ status: 400 });
      // fetch resolves a literal "/../" itself before sending; the escaped forms reach keygate as written.
      if (!path.includes("/../")) expect((await httpCheck(kg.ports.http, `/check${path}`, { "x-api-key": locked.secret })).status, path).toBe(400);
    }
  });

  it("context_extensions.project_id that disagrees with the path is a 500 ROUTE_MISCONFIGURED, for every key", async () => {
    const unlocked = await key("path-project-d", "");
    expect(outcome(await kg.check(checkInit({ "x-api-key": unlocked.secret }, "/projects/proj_a/jobs", "GET", { project_id: "proj_b" })))).toEqual({ status: 500, code: "ROUTE_MISCONFIGURED" });
  });
});
