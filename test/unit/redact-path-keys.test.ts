import { describe, expect, it } from "vitest";
import { KeyFormat } from "../../src/keys/key-format.js";
import { pathOnly } from "../../src/tracing/tracing.js";

// pathOnly (the access log's and the decision span's path) relies on redactText to hide a key a
// client put in its path ("a webhook-style URL or a misconfigured SDK"), also one joined to the
// text before it by "_" or by a long alphanumeric run, or with its underscores percent-encoded.
const key = new KeyFormat("kg").generate("live");
const body = key.slice("kg_live_".length);

describe("key shapes in a logged path", () => {
  for (const path of [`/hooks/slack_${key}`, `/v1/u/${"a".repeat(20)}${key}`, `/hooks/${key.replaceAll("_", "%5F")}`]) {
    it(`hides the key's random part in ${path.replace(body, "<body>")}`, () => {
      expect(pathOnly(path)).not.toContain(body.slice(0, 32));
    });
  }
});
