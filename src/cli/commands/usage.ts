import type { Command } from "commander";
import { z } from "zod";
import { GetUsageResponseSchema } from "../../gen/keygate/v1/key_admin_pb.js";
import { argsOf, onRun, optionsOf } from "../context.js";
import { day } from "../parsers.js";
import { oneId } from "../schemas.js";
import { usageReport } from "../views.js";

/** `keygate usage`: counted requests and spent credits per key and day. */
export function registerUsage(program: Command): void {
  const usage = program
    .command("usage")
    .description("counted requests and spent credits of an owner, in total and per key and UTC day")
    .argument("<owner>", "owner id")
    .requiredOption("--from <day>", "first UTC day, YYYY-MM-DD, inclusive", day)
    .requiredOption("--to <day>", "last UTC day, YYYY-MM-DD, inclusive; at most 366 days after --from", day);
  onRun(usage, async (context) => {
    const [ownerId] = argsOf(usage, oneId);
    const options = optionsOf(usage, z.object({ from: z.string(), to: z.string() }));
    const response = await context.admin.getUsage({ ownerId, from: options.from, to: options.to });
    context.emit(GetUsageResponseSchema, response, () => usageReport(response));
  });
}
