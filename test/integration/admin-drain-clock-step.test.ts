import { afterEach, describe, expect, it, vi } from "vitest";
import { until } from "../harness/poll.js";
import { TestClock } from "../harness/clock.js";
import { startKeygate } from "../harness/keygate.js";

// The admin listener's shutdown grace is measured on the monotonic clock, as the other listeners'
// timers are: measured on the wall clock (Date.now), a clock stepped back during a drain (an NTP
// correction) kept the admin drain, and the usage flush that follows it, waiting for as long as
// the step, far past KEYGATE_SHUTDOWN_GRACE_SECONDS.

describe("shutdown grace across a wall-clock step", () => {
  afterEach(() => {
    vi.restoreAllMocks();
  });

  it("stops after its grace when the wall clock steps back 1 h during the drain", async () => {
    const clock = new TestClock();
    clock.freeze("2027-03-10T12:00:00.000Z");
    // Requests may take longer than this test, so only the grace can end the held call.
    const kg = await startKeygate({ clock, env: { KEYGATE_REQUEST_TIMEOUT_SECONDS: "600" } });
    await kg.admin.upsertAccount({ ownerId: "drain" });
    // One admin call that never finishes: the drain waits for it until the grace is over.
    const held = vi.spyOn(kg.app.store, "getAccount").mockReturnValue(new Promise(() => undefined));
    const stuck = kg.admin.getAccount({ ownerId: "drain" }).catch(() => "cut");
    await until(() => held.mock.calls.length > 0, 10_000, "the admin call reaching the store");
    // NTP steps the wall clock back an hour right after the admin listener's drain has read it
    // once (the first wall-clock read from the admin server's code; none with a monotonic drain).
    const realNow = Date.now.bind(Date);
    let adminReads = 0;
    vi.spyOn(Date, "now").mockImplementation(() => {
      const now = realNow();
      if (new Error().stack?.includes("/server/admin.") !== true) return now;
      adminReads += 1;
      return adminReads === 1 ? now : now - 3_600_000;
    });
    // The grace is 2 s; timed on the wall clock the drain went on for the hour (past this test's timeout).
    await kg.stop();
    vi.restoreAllMocks();
    expect(await stuck).toBe("cut");
  }, 60_000);
});
