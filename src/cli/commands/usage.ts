import { create, equals } from "@bufbuild/protobuf";
import { InvalidArgumentError } from "commander";
import type { Command } from "commander";
import { z } from "zod";
import { GetUsageResponseSchema, UsageCountsSchema } from "../../gen/keygate/v1/key_admin_pb.js";
import type { UsageCounts } from "../../gen/keygate/v1/key_admin_pb.js";
import { argsOf, onRun, optionsOf } from "../context.js";
import { day, wholeNumber } from "../parsers.js";
import { oneId } from "../schemas.js";
import { usageReport } from "../views.js";

/** The most rows GetUsage answers per page: the fewest calls for a long range. */
const MAX_PAGE_SIZE = 1000;

function sameTotals(a: UsageCounts | undefined, b: UsageCounts | undefined): boolean {
  return equals(UsageCountsSchema, a ?? create(UsageCountsSchema), b ?? create(UsageCountsSchema));
}

/**
 * --page-size: a whole number, and not 0, which would ask keygate for the whole range in one
 * answer (page_size 0 without a page_token), refused past 10,000 rows; larger ones keygate refuses.
 */
function pageSize(value: string): number {
  const size = wholeNumber(value);
  if (size === 0) throw new InvalidArgumentError(`must be between 1 and ${MAX_PAGE_SIZE}`);
  return size;
}

/** `keygate usage`: counted requests and spent credits per key and day. */
export function registerUsage(program: Command): void {
  const usage = program
    .command("usage")
    .description("counted requests and spent credits of an owner, in total and per key and UTC day")
    .argument("<owner>", "owner id")
    .requiredOption("--from <day>", "first UTC day, YYYY-MM-DD, inclusive", day)
    .requiredOption("--to <day>", "last UTC day, YYYY-MM-DD, inclusive; at most 366 days after --from", day)
    .option("--page-size <n>", `rows asked for per call, 1-${MAX_PAGE_SIZE} (default: ${MAX_PAGE_SIZE}); every page is fetched and printed as one report`, pageSize);
  onRun(usage, async (context) => {
    const [ownerId] = argsOf(usage, oneId);
    const options = optionsOf(usage, z.object({ from: z.string(), to: z.string(), pageSize: z.number().optional() }));
    const request = { ownerId, from: options.from, to: options.to, pageSize: options.pageSize ?? MAX_PAGE_SIZE };
    // Pages until next_page_token is empty, so the report holds every row of the range. A keygate
    // from before paging answers the whole range at once, with no token.
    const first = await context.admin.getUsage(request);
    const report = create(GetUsageResponseSchema, { totals: first.totals, byKey: first.byKey });
    let moved = false;
    for (let token = first.nextPageToken; token !== "";) {
      const page = await context.admin.getUsage({ ...request, pageToken: token });
      moved ||= !sameTotals(page.totals, first.totals);
      report.byKey.push(...page.byKey);
      token = page.nextPageToken;
    }
    // Every page carries the totals of the whole range: they differ only when usage was counted
    // meanwhile (a range that holds today), and then the rows of earlier pages are older too.
    if (moved) process.stderr.write("keygate: usage in this range was counted while its pages were read; the totals are those of the first page\n");
    context.emit(GetUsageResponseSchema, report, () => usageReport(report));
  });
}
