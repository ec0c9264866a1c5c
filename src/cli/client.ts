import { createClient } from "@connectrpc/connect";
import type { Client, Interceptor } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { KeyAdmin } from "../gen/keygate/v1/key_admin_pb.js";

/** The KeyAdmin client every subcommand but `serve` uses. */
export type AdminClient = Client<typeof KeyAdmin>;

/** Where the CLI finds keygate's admin port when neither `--url` nor `KEYGATE_URL` says. */
export const DEFAULT_ADMIN_URL = "http://127.0.0.1:8080";

/** How long a call may take when `--call-timeout` does not say; past it, deadline_exceeded instead of a blocked script. */
export const DEFAULT_TIMEOUT_SECONDS = 30;

/** A Connect (HTTP/1.1) KeyAdmin client that sends `Authorization: Bearer <token>` on every call, each given `timeoutSeconds`. */
export function createAdminClient(baseUrl: string, token: string, timeoutSeconds: number): AdminClient {
  const bearer: Interceptor = (next) => (req) => {
    req.header.set("authorization", `Bearer ${token}`);
    return next(req);
  };
  const transport = createConnectTransport({ baseUrl, httpVersion: "1.1", interceptors: [bearer], defaultTimeoutMs: timeoutSeconds * 1000 });
  return createClient(KeyAdmin, transport);
}
