import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import { describe, expect, it } from "vitest";
import { DEFAULT_POLICY_INPUT, parsePolicy, parseYamlText } from "../../src/config.js";

// README "The decision": the ```yaml example of a `{project}` route, and the inline catch-all
// route the same section recommends, must be YAML a policy file can hold. In a flow mapping
// (`{ ... }`) a plain scalar cannot contain `{` or `}`: the unquoted `/projects/{project}/jobs`
// the README showed stopped the start with "is not valid YAML: UNEXPECTED_TOKEN ... in
// routes.N.pathPrefix".

const readme = readFileSync(resolve(import.meta.dirname, "../../README.md"), "utf8");

function projectRouteYamlBlock(): string {
  const blocks = [...readme.matchAll(/```yaml\n([\s\S]*?)```/g)].map((m) => m[1] ?? "");
  const block = blocks.find((b) => b.includes("{project}"));
  if (block === undefined) throw new Error("README has no ```yaml block with a {project} route");
  return block;
}

function inlineCatchAll(): string {
  const m = /end the route list with a catch-all `(\{ method: "\*", pathPrefix: [^`]*\})`/.exec(readme.replace(/\n/g, " "));
  if (m?.[1] === undefined) throw new Error("README has no inline catch-all {project} route");
  return m[1];
}

describe("README {project} route examples", () => {
  it("the ```yaml routes example parses as a policy's routes", () => {
    const parsed = parseYamlText(projectRouteYamlBlock());
    expect(parsed.ok ? "ok" : `${parsed.problem.code} at ${parsed.problem.line}:${parsed.problem.column} in ${parsed.problem.field}`).toBe("ok");
    if (!parsed.ok) return;
    const routes = (parsed.value as { routes: unknown[] }).routes;
    expect(parsePolicy({ ...DEFAULT_POLICY_INPUT, routes }).routes[0]).toMatchObject({ pathPrefix: "/projects/{project}/jobs" });
  });

  it("the inline catch-all route parses as one route", () => {
    const parsed = parseYamlText(`routes:\n  - ${inlineCatchAll()}\n`);
    expect(parsed.ok ? "ok" : `${parsed.problem.code} in ${parsed.problem.field}`).toBe("ok");
  });
});
