import type { Command } from "commander";
import { z } from "zod";
import { ListAuditEventsResponseSchema } from "../../gen/keygate/v1/key_admin_pb.js";
import { onRun, optionsOf } from "../context.js";
import { instant, wholeNumber } from "../parsers.js";
import { timestamp } from "../schemas.js";
import { auditTable, nextPage } from "../views.js";

/** `keygate audit`: the trail of KeyAdmin changes. */
export function registerAudit(program: Command): void {
  const audit = program
    .command("audit")
    .description("list KeyAdmin changes (who changed which key or account, and what), oldest first")
    .option("--owner <id>", "only changes to this owner's account and keys")
    .option("--key <id>", "only changes to this key")
    .option("--since <time>", "only changes at or after this RFC 3339 time, e.g. 2027-01-31T00:00:00Z", instant)
    .option("--page-size <n>", "events per page, 1-100 (default: 50)", wholeNumber)
    .option("--page-token <token>", "the token a previous page printed");
  const schema = z.object({
    owner: z.string().optional(),
    key: z.string().optional(),
    since: timestamp.optional(),
    pageSize: z.number().optional(),
    pageToken: z.string().optional(),
  });
  onRun(audit, async (context) => {
    const options = optionsOf(audit, schema);
    const response = await context.admin.listAuditEvents({
      ownerId: options.owner ?? "",
      keyId: options.key ?? "",
      since: options.since,
      pageSize: options.pageSize ?? 0,
      pageToken: options.pageToken ?? "",
    });
    context.emit(ListAuditEventsResponseSchema, response, () => auditTable(response.events) + nextPage(response.nextPageToken));
  });
}
