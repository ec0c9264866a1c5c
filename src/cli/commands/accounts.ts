import type { Command } from "commander";
import { z } from "zod";
import { AddCreditsResponseSchema, ChargeUsageResponseSchema, GetAccountResponseSchema, UpsertAccountResponseSchema } from "../../gen/keygate/v1/key_admin_pb.js";
import type { Account } from "../../gen/keygate/v1/key_admin_pb.js";
import { argsOf, onRun, optionsOf } from "../context.js";
import { shellWord } from "../format.js";
import { credits } from "../parsers.js";
import { oneId } from "../schemas.js";
import { accountDetails, chargeDetails, topUpDetails } from "../views.js";

function shown(account: Account | undefined): string {
  return account === undefined ? "" : accountDetails(account);
}

/** `keygate accounts …`: the owners of keys, their plans and credits. */
export function registerAccounts(program: Command): void {
  const accounts = program.command("accounts").description("create and change accounts (the owners of keys), their plans and credits");

  const set = accounts
    .command("set")
    .description("create an account, or change the fields given")
    .argument("<owner>", "owner id")
    .option("--plan <plan>", "a plan from the policy, e.g. basic, pro, business")
    .option("--subscription <status>", "active, none, past_due or canceled")
    .option("--role <role>", "standard, premium or admin");
  const setSchema = z.object({ plan: z.string().optional(), subscription: z.string().optional(), role: z.string().optional() });
  onRun(set, async (context) => {
    const [ownerId] = argsOf(set, oneId);
    const options = optionsOf(set, setSchema);
    const response = await context.admin.upsertAccount({ ownerId, plan: options.plan, subscriptionStatus: options.subscription, role: options.role });
    context.emit(UpsertAccountResponseSchema, response, () => shown(response.account));
  });

  const get = accounts.command("get").description("show an account: plan, key cap, credits, quota and rate limit").argument("<owner>", "owner id");
  onRun(get, async (context) => {
    const [ownerId] = argsOf(get, oneId);
    const response = await context.admin.getAccount({ ownerId });
    context.emit(GetAccountResponseSchema, response, () => shown(response.account));
  });

  const addCredits = accounts
    .command("add-credits")
    .description("top up an account's credit balance (adds; never replaces)")
    .argument("<owner>", "owner id")
    .argument("<amount>", "credits to add, 1 to 1000000000", credits)
    .option("--reason <text>", "why (an order id, say); kept in the log and the audit trail")
    .option("--idempotency-key <key>", "the top-up's own id (the order or payment id): a repeat within 24 hours adds nothing");
  const addCreditsArgs = z.tuple([z.string(), z.bigint()]);
  const addCreditsOptions = z.object({ reason: z.string().optional(), idempotencyKey: z.string().optional() });
  // Without an idempotency key, a blind retry after a lost answer adds the credits twice; with one it adds nothing, so "retry" is right.
  const beforeRetry = (): string | null => {
    if (optionsOf(addCredits, addCreditsOptions).idempotencyKey !== undefined) return null;
    const owner = shellWord(argsOf(addCredits, addCreditsArgs)[0]);
    return `keygate may have added the credits all the same: before retrying, look for the top-up in keygate audit --owner ${owner} (a top-up given --idempotency-key can be retried safely)`;
  };
  onRun(addCredits, async (context) => {
    const [ownerId, amount] = argsOf(addCredits, addCreditsArgs);
    const options = optionsOf(addCredits, addCreditsOptions);
    const response = await context.admin.addCredits({ ownerId, amount, reason: options.reason ?? "", idempotencyKey: options.idempotencyKey ?? "" });
    context.emit(AddCreditsResponseSchema, response, () => topUpDetails(response));
  }, beforeRetry);

  const charge = accounts
    .command("charge")
    .description("charge one metered use of <cost> credits from a backend (the daily quota and credits a Check uses); exits 0 whenever keygate answered, so read charged: (.charged with --json)")
    .argument("<owner>", "owner id (with --key: the key's owner)")
    .argument("<cost>", "credits to spend, 0 to 1000000000; every charge also counts one use of the daily quota", credits)
    .requiredOption("--idempotency-key <key>", "unique per charge: a retry with the same key within 24 hours charges nothing and prints the first answer")
    .option("--key <id>", "charge as this key's usage (it must be the owner's and in use)")
    .option("--quota <name>", "the named daily quota the use counts toward (a plan's quotas); default: the plan's daily quota");
  onRun(charge, async (context) => {
    const [ownerId, cost] = argsOf(charge, z.tuple([z.string(), z.bigint()]));
    const options = optionsOf(charge, z.object({ idempotencyKey: z.string(), key: z.string().optional(), quota: z.string().optional() }));
    const response = await context.admin.chargeUsage({ ownerId, keyId: options.key ?? "", cost, idempotencyKey: options.idempotencyKey, quota: options.quota ?? "" });
    context.emit(ChargeUsageResponseSchema, response, () => chargeDetails(response));
  });
}
