import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { equals, fromBinary } from "@bufbuild/protobuf";
import { afterAll, describe, expect, it } from "vitest";
import { checkRequest } from "../../bench/data.js";
import { parseH2load, writeFixedRequest } from "../../bench/h2load.js";
import { CheckRequestSchema } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";

const dirs: string[] = [];
afterAll(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

describe("bench h2load (one-key load generator)", () => {
  it("frames the fixed request as one uncompressed gRPC message that protobuf-es decodes back", () => {
    const dir = mkdtempSync(join(tmpdir(), "keygate-h2load-unit-"));
    dirs.push(dir);
    const request = checkRequest("kg_live_notarealkeynotarealkeynotarea000000", 7);
    const fixed = writeFixedRequest(join(dir, "one.grpc"), request);
    const frame = readFileSync(fixed.path);
    expect(frame[0]).toBe(0);
    expect(frame.readUInt32BE(1)).toBe(frame.length - 5);
    expect(Buffer.from(frame.subarray(5)).equals(Buffer.from(fixed.message))).toBe(true);
    expect(equals(CheckRequestSchema, fromBinary(CheckRequestSchema, frame.subarray(5)), request)).toBe(true);
  });

  it("counts only HTTP 200 as answered and takes latencies from those alone", () => {
    const stdout = "finished in 2.00s, 3.00 req/s, 1KB/s\nrequests: 5 total, 5 started, 5 done, 3 succeeded, 2 failed, 1 errored, 0 timeout\n";
    // start µs, HTTP status, µs to end of response; -1 is a failed stream.
    const log = ["1\t200\t1000", "2\t200\t3000", "3\t-1\t50", "4\t503\t10", "5\t200\t2000", ""].join("\n");
    const result = parseH2load(stdout, log);
    expect(result.http200).toBe(3);
    expect(result.failed).toBe(2);
    expect(result.seconds).toBe(2);
    expect(result.rps).toBe(1.5);
    expect(result.statusCodes).toEqual({ "200": 3, "-1": 1, "503": 1 });
    expect(result.latencyMs).toEqual({ p50: 2, p90: 3, p99: 3, max: 3 });
  });

  it("reads a run shorter than a second, reported in ms, and refuses output without a finish line", () => {
    expect(parseH2load("finished in 500.00ms, 2.00 req/s, 1KB/s\n", "1\t200\t1000\n").seconds).toBe(0.5);
    expect(() => parseH2load("connect failed\n", "")).toThrow(/finished in/);
  });
});
