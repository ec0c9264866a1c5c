import { setLogger as setGrpcLogger } from "@grpc/grpc-js";
import { ConfigError, loadConfig } from "../../config.js";
import { redactText } from "../../keys/redact.js";
import { buildKeygate } from "../../server/app.js";
import type { BoundPorts } from "../../server/app.js";
import { createLogger } from "../../server/logger.js";
import { markAdminTokenShown } from "../../server/secrets.js";

/** Configuration mistakes exit 2 with the message; anything else is a crash. */
function exitOnConfigError(error: unknown): never {
  if (error instanceof ConfigError) {
    process.stderr.write(`keygate: ${error.message}\n`);
    process.exit(2);
  }
  throw error;
}

/** `keygate serve`: reads the environment, starts every listener, and drains on SIGTERM or SIGINT. */
export async function serve(options: { migrate: boolean } = { migrate: true }): Promise<void> {
  let config;
  try {
    config = loadConfig();
  } catch (error) {
    exitOnConfigError(error);
  }
  // The configured pepper and admin tokens are scrubbed from every log line by value, too.
  const secrets = [config.pepper ?? "", ...(config.adminTokens ?? [])];
  const logger = createLogger(config.logLevel, undefined, secrets);
  // grpc-js writes its own errors to stderr as bare lines ("No address added ..."); they go to the
  // JSON log instead, and a failure that stops the start is reported once, below.
  setGrpcLogger({ error: (...args: unknown[]) => logger.debug({ grpc: args.map(String).join(" ") }, "grpc-js") });
  let generatedAdminToken: string | null = null;
  // Printed by the first start that gets its listeners up, and never logged; before the "keygate
  // listening" line, so whoever waits for that line has the token too.
  const announce = (ports: BoundPorts): void => {
    if (generatedAdminToken === null) return;
    process.stdout.write(
      `\nkeygate generated an admin token (stored in ${config.dataDir}/admin-token, mode 0600):\n  ${generatedAdminToken}\n` +
        `Use it: curl -H "Authorization: Bearer $(cat ${config.dataDir}/admin-token)" -H 'content-type: application/json' ` +
        `-d '{"ownerId":"user_1","name":"first key"}' http://127.0.0.1:${ports.admin}/keygate.v1.KeyAdmin/CreateKey\n\n`,
    );
  };
  // Anything else that stops a start is one line too, with the full error in the (scrubbed) log.
  const exitOnStartError = (error: unknown): never => {
    if (error instanceof ConfigError) exitOnConfigError(error);
    logger.fatal({ err: error }, "keygate could not start");
    const firstLine = (error instanceof Error ? error.message : String(error)).split("\n")[0] ?? "";
    process.stderr.write(`keygate: could not start: ${redactText(firstLine, secrets)}\n`);
    process.exit(1);
  };
  const keygate = await buildKeygate(config, { logger, announce, migrate: options.migrate }).catch(exitOnStartError);
  generatedAdminToken = keygate.generatedAdminToken;
  await keygate.start().catch(exitOnStartError);
  if (generatedAdminToken !== null) markAdminTokenShown(config.dataDir);
  let stopping = false;
  const shutdown = (signal: string): void => {
    if (stopping) return;
    stopping = true;
    logger.info({ signal }, "draining");
    keygate.stop().then(
      () => process.exit(0),
      (error: unknown) => {
        logger.error({ err: error }, "shutdown failed");
        process.exit(1);
      },
    );
  };
  process.on("SIGTERM", () => shutdown("SIGTERM"));
  process.on("SIGINT", () => shutdown("SIGINT"));
}
