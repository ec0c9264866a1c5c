import { describe, expect, it } from "vitest";
import { parseOptions } from "../../bench/options.js";
import { SCENARIOS } from "../../bench/scenarios.js";

const argv = (...args: string[]) => ["node", "bench", ...args];

describe("bench options", () => {
  it("runs every scenario and the one-key runs by default", () => {
    const options = parseOptions(argv());
    expect(options.scenarios).toEqual([...SCENARIOS]);
    expect(options.oneKey).toBe(true);
  });

  it("--scenarios keeps report order whatever order it is given in, and --no-one-key skips h2load", () => {
    const options = parseOptions(argv("--scenarios", "flood, cold,hot", "--no-one-key"));
    expect(options.scenarios).toEqual(["hot", "cold", "flood"]);
    expect(options.oneKey).toBe(false);
  });

  it("refuses a scenario it does not know, naming it", () => {
    expect(() => parseOptions(argv("--scenarios", "hot,warm"))).toThrow(/warm/);
  });

  it("starts keygate on jemalloc as the image does unless --malloc system, and refuses another allocator", () => {
    expect(parseOptions(argv()).malloc).toBe("jemalloc");
    expect(parseOptions(argv("--malloc", "system")).malloc).toBe("system");
    expect(() => parseOptions(argv("--malloc", "tcmalloc"))).toThrow(/jemalloc|system/);
  });

  it("--gc-thread-nice sets KEYGATE_GC_THREAD_NICE's value (0 to 19) and is unset by default", () => {
    expect(parseOptions(argv()).gcThreadNice).toBeNull();
    expect(parseOptions(argv("--gc-thread-nice", "19")).gcThreadNice).toBe(19);
    expect(parseOptions(argv("--gc-thread-nice", "0")).gcThreadNice).toBe(0);
    for (const bad of ["20", "-1", "1.5", "high"]) expect(() => parseOptions(argv("--gc-thread-nice", bad)), bad).toThrow(/0 to 19/);
  });

  it("--backend-jvm-flags adds JVM options for the MongoDB-wire server, none by default", () => {
    expect(parseOptions(argv()).backendJvmFlags).toEqual([]);
    expect(parseOptions(argv("--backend-jvm-flags", " -XX:-UseSerialGC  -XX:+UseZGC ")).backendJvmFlags).toEqual(["-XX:-UseSerialGC", "-XX:+UseZGC"]);
  });

  it("--turns sets the rounds of hot in turns with the ceiling: 3 in a full run, 1 in a quick one, 0 to skip", () => {
    expect(parseOptions(argv()).turns).toBe(3);
    expect(parseOptions(argv("--quick")).turns).toBe(1);
    expect(parseOptions(argv("--turns", "5")).turns).toBe(5);
    expect(parseOptions(argv("--turns", "0")).turns).toBe(0);
  });

  it("fixed rates run before saturation unless --saturation-first", () => {
    expect(parseOptions(argv()).saturationFirst).toBe(false);
    expect(parseOptions(argv("--saturation-first")).saturationFirst).toBe(true);
  });
});
