import { timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import type { AuditEvent } from "../../src/gen/keygate/v1/key_admin_pb.js";
import type { TestKeygate } from "./keygate.js";

/** The margin README "Audit trail" (Tailing the trail) gives an exporter: it re-reads from the newest time it has seen minus this. */
export const SETTLE_MARGIN_MS = 5 * 60_000;

/** Every audit record of `ownerId` at or after `since` (ms), read page by page (`pageSize` a page) as an exporter does. */
export async function readAuditFrom(kg: TestKeygate, ownerId: string, since: number, pageSize = 50): Promise<AuditEvent[]> {
  const events: AuditEvent[] = [];
  let pageToken = "";
  do {
    const page = await kg.admin.listAuditEvents({ ownerId, since: timestampFromMs(since), pageSize, pageToken });
    events.push(...page.events);
    pageToken = page.nextPageToken;
  } while (pageToken !== "");
  return events;
}

/** The newest record time among `events`, in ms (a record with no time counts as 0). */
export function newestMs(events: readonly AuditEvent[]): number {
  return Math.max(...events.map((e) => timestampMs(e.time ?? timestampFromMs(0))));
}
