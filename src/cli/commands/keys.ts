import { Option } from "commander";
import type { Command } from "commander";
import { z } from "zod";
import {
  CreateKeyResponseSchema,
  DisableKeyResponseSchema,
  EnableKeyResponseSchema,
  GetKeyResponseSchema,
  ListKeysResponseSchema,
  RevokeKeyResponseSchema,
  RotateKeyResponseSchema,
  UpdateKeyResponseSchema,
  VerifyKeyResponseSchema,
} from "../../gen/keygate/v1/key_admin_pb.js";
import type { ApiKey } from "../../gen/keygate/v1/key_admin_pb.js";
import { argsOf, onRun, optionsOf } from "../context.js";
import { details, shellWord } from "../format.js";
import { collect, collectPairs, instant, rateLimit, wholeNumber } from "../parsers.js";
import { oneId, rateLimitValue, strings, timestamp } from "../schemas.js";
import { checkQuiet, printIssuedSecret } from "../secret.js";
import { readStdin } from "../stdin.js";
import { keyDetails, keyTable, nextPage, time, verifyDetails } from "../views.js";
import type { Pair } from "../views.js";

const QUIET_HELP = "print only the secret on stdout, for piping into a secret store (the warning stays on stderr)";

function shown(key: ApiKey | undefined, extra: readonly Pair[] = []): string {
  return key === undefined ? details(extra) : keyDetails(key, extra);
}

function registerCreate(keys: Command): void {
  const create = keys
    .command("create")
    .description("issue a key; its secret is printed once and cannot be shown again")
    .requiredOption("--owner <id>", "owner id; an unknown owner gets an account on the default plan")
    .requiredOption("--name <name>", "a name to recognise the key by")
    .option("--scope <scope>", "a scope the key grants; repeat for more (default: the policy's default scopes)", collect)
    .option("--project <id>", "lock the key to one project")
    .addOption(new Option("--mode <mode>", "live or test (default: live)").choices(["live", "test"]))
    .option("--expires <time>", "when the key stops working, RFC 3339, e.g. 2027-01-31T00:00:00Z (default: never)", instant)
    .option("--rate-limit <requests/seconds>", "the key's own rate limit, e.g. 100/60 (default: the plan's)", rateLimit)
    .option("--metadata <key=value>", "a metadata entry; repeat for more", collectPairs)
    .option("-q, --quiet", QUIET_HELP);
  const schema = z.object({
    owner: z.string(),
    name: z.string(),
    scope: strings.optional(),
    project: z.string().optional(),
    mode: z.enum(["live", "test"]).optional(),
    expires: timestamp.optional(),
    rateLimit: rateLimitValue.optional(),
    metadata: z.record(z.string(), z.string()).optional(),
    quiet: z.boolean().optional(),
  });
  // CreateKey takes no idempotency key: after a lost answer, a blind retry issues a second key.
  const beforeRetry = (): string =>
    `keygate may have issued the key all the same: before retrying, look for it with keygate keys list --owner ${shellWord(optionsOf(create, schema).owner)}, ` +
    "and revoke a key whose secret you did not get (keygate keys revoke <id>)";
  onRun(create, async (context) => {
    const options = optionsOf(create, schema);
    const quiet = options.quiet === true;
    checkQuiet(create, context, quiet);
    const response = await context.admin.createKey({
      ownerId: options.owner,
      name: options.name,
      scopes: options.scope ?? [],
      projectId: options.project ?? "",
      mode: options.mode ?? "",
      expiresAt: options.expires,
      rateLimit: options.rateLimit,
      metadata: options.metadata ?? {},
    });
    await printIssuedSecret(context, quiet, {
      schema: CreateKeyResponseSchema,
      response,
      secret: response.secret,
      keyId: response.key?.id ?? "the new key",
      human: (secretLine) => shown(response.key, [secretLine]),
    });
  }, beforeRetry);
}

function registerList(keys: Command): void {
  const list = keys
    .command("list")
    .description("list an owner's keys, oldest first (revoked keys only with --include-revoked)")
    .requiredOption("--owner <id>", "owner id")
    .option("--project <id>", "only keys locked to this project")
    .option("--include-revoked", "also list revoked keys")
    .option("--page-size <n>", "keys per page, 1-100 (default: 50)", wholeNumber)
    .option("--page-token <token>", "the token a previous page printed");
  const schema = z.object({
    owner: z.string(),
    project: z.string().optional(),
    includeRevoked: z.boolean().optional(),
    pageSize: z.number().optional(),
    pageToken: z.string().optional(),
  });
  onRun(list, async (context) => {
    const options = optionsOf(list, schema);
    const response = await context.admin.listKeys({
      ownerId: options.owner,
      projectId: options.project ?? "",
      includeRevoked: options.includeRevoked === true,
      pageSize: options.pageSize ?? 0,
      pageToken: options.pageToken ?? "",
    });
    context.emit(ListKeysResponseSchema, response, () => keyTable(response.keys) + nextPage(response.nextPageToken));
  });
}

function registerGet(keys: Command): void {
  const get = keys.command("get").description("show one key's metadata (never its secret)").argument("<id>", "key id (key_…)");
  onRun(get, async (context) => {
    const [id] = argsOf(get, oneId);
    const response = await context.admin.getKey({ id });
    context.emit(GetKeyResponseSchema, response, () => shown(response.key));
  });
}

function registerUpdates(keys: Command): void {
  const rename = keys.command("rename").description("rename a key").argument("<id>", "key id (key_…)").argument("<name>", "the new name");
  onRun(rename, async (context) => {
    const [id, name] = argsOf(rename, z.tuple([z.string(), z.string()]));
    const response = await context.admin.updateKey({ id, name });
    context.emit(UpdateKeyResponseSchema, response, () => shown(response.key));
  });

  const scopes = keys
    .command("scopes")
    .description("replace a key's scopes")
    .argument("<id>", "key id (key_…)")
    .argument("<scope...>", "the scopes the key grants from now on");
  onRun(scopes, async (context) => {
    const [id, list] = argsOf(scopes, z.tuple([z.string(), strings]));
    const response = await context.admin.updateKey({ id, scopes: list });
    context.emit(UpdateKeyResponseSchema, response, () => shown(response.key));
  });

  const revoke = keys
    .command("revoke")
    .description("revoke a key for good, at once (revoking a revoked key changes nothing; keys disable pauses one)")
    .argument("<id>", "key id (key_…)")
    .option("--reason <text>", "why, kept with the key and in the audit trail");
  onRun(revoke, async (context) => {
    const [id] = argsOf(revoke, oneId);
    const options = optionsOf(revoke, z.object({ reason: z.string().optional() }));
    const response = await context.admin.revokeKey({ id, reason: options.reason ?? "" });
    context.emit(RevokeKeyResponseSchema, response, () => shown(response.key));
  });

  const disable = keys
    .command("disable")
    .description("refuse a key until it is enabled again (KEY_DISABLED); unlike revoke, it can be undone")
    .argument("<id>", "key id (key_…)")
    .option("--reason <text>", "why, kept in the audit trail");
  onRun(disable, async (context) => {
    const [id] = argsOf(disable, oneId);
    const options = optionsOf(disable, z.object({ reason: z.string().optional() }));
    const response = await context.admin.disableKey({ id, reason: options.reason ?? "" });
    context.emit(DisableKeyResponseSchema, response, () => shown(response.key));
  });

  const enable = keys.command("enable").description("let a disabled key through again").argument("<id>", "key id (key_…)");
  onRun(enable, async (context) => {
    const [id] = argsOf(enable, oneId);
    const response = await context.admin.enableKey({ id });
    context.emit(EnableKeyResponseSchema, response, () => shown(response.key));
  });
}

function previousLines(previous: ApiKey | undefined): Pair[] {
  if (previous === undefined) return [];
  return [
    ["previous", previous.id],
    ["previous state", previous.state],
    ["grace ends", time(previous.graceEndsAt)],
  ];
}

function registerRotate(keys: Command): void {
  const rotate = keys
    .command("rotate")
    .description("issue a successor key; the old one keeps working for the grace period. The new secret is printed once")
    .argument("<id>", "key id (key_…)")
    .option("--grace-days <n>", "days the old key keeps working, 0-30; 0 revokes it at once (default: 7)", wholeNumber)
    .option("-q, --quiet", QUIET_HELP);
  const schema = z.object({ graceDays: z.number().optional(), quiet: z.boolean().optional() });
  // A retry of a rotation that was made is refused (the key is no longer active), but the successor's secret is lost.
  const beforeRetry = (): string => {
    const id = shellWord(argsOf(rotate, oneId)[0]);
    return `keygate may have rotated ${id} all the same: before retrying, check keygate keys get ${id}; if it shows "rotated to", revoke that successor, whose secret you did not get (keygate keys revoke <id>)`;
  };
  onRun(rotate, async (context) => {
    const [id] = argsOf(rotate, oneId);
    const options = optionsOf(rotate, schema);
    const quiet = options.quiet === true;
    checkQuiet(rotate, context, quiet);
    const response = await context.admin.rotateKey({ id, graceDays: options.graceDays });
    await printIssuedSecret(context, quiet, {
      schema: RotateKeyResponseSchema,
      response,
      secret: response.secret,
      keyId: response.key?.id ?? "the new key",
      human: (secretLine) => shown(response.key, [...previousLines(response.previous), secretLine]),
    });
  }, beforeRetry);
}

async function secretFrom(command: Command, argument: string | undefined): Promise<string> {
  if (argument !== undefined) return argument;
  const secret = await readStdin("keygate: paste the key, then press Enter and Ctrl-D\n");
  if (secret === "") command.error("no key given: pipe it on stdin (keeps it out of shell history) or pass it as an argument");
  return secret;
}

function registerVerify(keys: Command): void {
  const verify = keys
    .command("verify")
    .description("check a key as Check would, without charging it; exits 0 whenever keygate answered, so read valid: (.valid with --json)")
    .argument("[secret]", "the key; omit it to read it from stdin, which keeps it out of shell history")
    .option("--scope <scope>", "also require this scope; repeat for more", collect)
    .option("--project <id>", "also check the key's project lock against this project");
  const schema = z.object({ scope: strings.optional(), project: z.string().optional() });
  onRun(verify, async (context) => {
    const [argument] = argsOf(verify, z.tuple([z.string().optional()]));
    const options = optionsOf(verify, schema);
    const secret = await secretFrom(verify, argument);
    const response = await context.admin.verifyKey({ secret, requiredScopes: options.scope ?? [], projectId: options.project ?? "" });
    context.emit(VerifyKeyResponseSchema, response, () => verifyDetails(response));
  });
}

/** `keygate keys …`: the key lifecycle. */
export function registerKeys(program: Command): void {
  const keys = program.command("keys").description("issue, list, change, rotate, revoke and verify API keys");
  registerCreate(keys);
  registerList(keys);
  registerGet(keys);
  registerUpdates(keys);
  registerRotate(keys);
  registerVerify(keys);
}
