import { decodeTime } from "ulid";
import { describe, expect, it } from "vitest";
import { EventIds } from "../../src/keys/ids.js";

// Audit event ids: ListAuditEvents pages by id, so an id's ULID time is its record's time, and a
// revoke's or keyed top-up's id is derived from the change, the same on every call that records it.

const T = Date.UTC(2026, 11, 7, 3, 0, 0, 123);
const ID = /^evt_[0-9A-HJKMNP-TV-Z]{26}$/;
const timeOf = (id: string): number => decodeTime(id.slice(4));

describe("audit event ids happy", () => {
  it("a new id has its record's time, and ids of one millisecond sort in the order they were made", () => {
    const ids = new EventIds();
    const made = [ids.next(T), ids.next(T), ids.next(T + 1), ids.next(T + 1)];
    for (const id of made) expect(id).toMatch(ID);
    expect(made.map(timeOf)).toEqual([T, T, T + 1, T + 1]);
    expect([...made].sort()).toEqual(made);
  });

  it("a derived id is the change's time and identity, whoever makes it: another instance, later, gets the same", () => {
    const first = new EventIds().derived(T, ["key.revoke", "key_01KC0000000000000000000000"]);
    const retry = new EventIds();
    retry.next(T + 60_000);
    expect(retry.derived(T, ["key.revoke", "key_01KC0000000000000000000000"])).toBe(first);
    expect(first).toMatch(ID);
    expect(timeOf(first)).toBe(T);
    expect(new EventIds().derived(T, ["key.revoke", "key_01KC0000000000000000000001"])).not.toBe(first);
    expect(new EventIds().derived(T + 1, ["key.revoke", "key_01KC0000000000000000000000"])).not.toBe(first);
    // The parts are kept apart: owner "a b" and key "c" is not owner "a" and key "b c".
    expect(new EventIds().derived(T, ["credits.add", "a b", "c"])).not.toBe(new EventIds().derived(T, ["credits.add", "a", "b c"]));
  });

  it("within one millisecond a derived id sorts after the new ids made before it and before those made after it", () => {
    for (let i = 0; i < 200; i++) {
      const ids = new EventIds();
      const made = [ids.next(T), ids.next(T), ids.derived(T, ["key.revoke", `key_${i}`]), ids.next(T), ids.next(T + 1)];
      expect([...made].sort()).toEqual(made);
    }
  });
});

describe("audit event ids error", () => {
  it("a clock that goes back keeps new ids in order, at the latest time seen", () => {
    const ids = new EventIds();
    const later = ids.next(T + 5);
    const back = ids.next(T);
    expect(back > later).toBe(true);
    expect(timeOf(back)).toBe(T + 5);
  });

  it("seeded with the trail's newest id (a restart after the clock went back), new ids sort after it, at its time", () => {
    const newest = new EventIds().derived(T + 3_600_000, ["key.revoke", "key_01KC0000000000000000000000"]);
    const ids = new EventIds();
    ids.seed(newest);
    expect(ids.lastMs).toBe(T + 3_600_000);
    const next = ids.next(T);
    expect(next > newest).toBe(true);
    expect(timeOf(next)).toBe(T + 3_600_000);
  });

  it("a seed older than the ids made, or not an event id, changes nothing", () => {
    const ids = new EventIds();
    const made = ids.next(T + 5);
    ids.seed(new EventIds().next(T));
    ids.seed("aud_marker");
    ids.seed("evt_Z0000000000000000000000000");
    expect(ids.lastMs).toBe(T + 5);
    expect(ids.next(T + 5) > made).toBe(true);
  });
});
