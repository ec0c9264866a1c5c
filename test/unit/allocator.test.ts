import { describe, expect, it } from "vitest";
import { allocatorOf, findJemalloc, IMAGE_JEMALLOC, processAllocator } from "../../src/server/allocator.js";

// Lines of a real node process's /proc/<pid>/maps, and the library lines a preload adds.
const NODE_MAPS = [
  "00400000-00401000 r--p 00000000 fd:01 1572903                            /usr/local/bin/node",
  "7f3a1c000000-7f3a1c021000 rw-p 00000000 00:00 0 ",
  "7f3a2a7e2000-7f3a2a808000 r--p 00000000 fd:01 1050420                    /usr/lib/x86_64-linux-gnu/libc.so.6",
  "7f3a2aa10000-7f3a2aa20000 r-xp 00010000 fd:01 1050500                    /usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.30",
  "7ffd5e3f0000-7ffd5e411000 rw-p 00000000 00:00 0                          [stack]",
].join("\n");
const line = (path: string) => `7f3a2b000000-7f3a2b040000 r-xp 00010000 fd:01 1050600                    ${path}`;

describe("allocatorOf", () => {
  it("reads the system's malloc when no allocator library is mapped", () => {
    expect(allocatorOf(NODE_MAPS)).toBe("system");
    expect(allocatorOf("")).toBe("system");
  });

  it("names a preloaded jemalloc, tcmalloc or mimalloc by its mapped library", () => {
    expect(allocatorOf(`${NODE_MAPS}\n${line("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")}`)).toBe("jemalloc");
    expect(allocatorOf(`${NODE_MAPS}\n${line(IMAGE_JEMALLOC)}`)).toBe("jemalloc");
    expect(allocatorOf(`${NODE_MAPS}\n${line("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.9")}`)).toBe("tcmalloc");
    expect(allocatorOf(`${NODE_MAPS}\n${line("/usr/lib/x86_64-linux-gnu/libmimalloc.so.2.0")}`)).toBe("mimalloc");
  });

  it("goes by the library's file name, not by a directory that mentions one", () => {
    expect(allocatorOf(`${NODE_MAPS}\n${line("/opt/libjemalloc-build/bin/tool")}`)).toBe("system");
    expect(allocatorOf(`${NODE_MAPS}\n${line("/srv/jemalloc/libfoo.so")}`)).toBe("system");
  });
});

describe("processAllocator", () => {
  it("is unknown where the memory map cannot be read", () => {
    expect(
      processAllocator(() => {
        throw new Error("ENOENT: /proc/self/maps");
      }),
    ).toBe("unknown");
  });

  it("reads this process's own map by default", () => {
    const expected = process.platform === "linux" ? allocatorOf(NODE_MAPS) : "unknown";
    // The test runner is started without a preload (CI and `npm test`), so it is on the system's malloc.
    if (process.env["LD_PRELOAD"] === undefined) expect(processAllocator()).toBe(expected);
  });
});

describe("findJemalloc", () => {
  const machine = process.arch === "arm64" ? "aarch64" : "x86_64";
  const debian = `/usr/lib/${machine}-linux-gnu/libjemalloc.so.2`;

  it("finds Debian's libjemalloc2 first, then the image's link", () => {
    expect(findJemalloc((path) => path === debian || path === IMAGE_JEMALLOC)).toBe(debian);
    expect(findJemalloc((path) => path === IMAGE_JEMALLOC)).toBe(IMAGE_JEMALLOC);
  });

  it("is null when jemalloc is not installed", () => {
    expect(findJemalloc(() => false)).toBeNull();
  });
});
