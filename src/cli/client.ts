import { createClient } from "@connectrpc/connect";
import type { Client, Interceptor } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { KeyAdmin } from "../gen/keygate/v1/key_admin_pb.js";

/** The KeyAdmin client every subcommand but `serve` uses. */
export type AdminClient = Client<typeof KeyAdmin>;

/** Where the CLI finds keygate's admin port when neither `--url` nor `KEYGATE_URL` says. */
export const DEFAULT_ADMIN_URL = "http://127.0.0.1:8080";

// A call that hangs this long is reported as deadline_exceeded instead of blocking a script.
const CALL_TIMEOUT_MS = 30_000;

/** A Connect (HTTP/1.1) KeyAdmin client that sends `Authorization: Bearer <token>` on every call. */
export function createAdminClient(baseUrl: string, token: string): AdminClient {
  const bearer: Interceptor = (next) => (req) => {
    req.header.set("authorization", `Bearer ${token}`);
    return next(req);
  };
  const transport = createConnectTransport({ baseUrl, httpVersion: "1.1", interceptors: [bearer], defaultTimeoutMs: CALL_TIMEOUT_MS });
  return createClient(KeyAdmin, transport);
}
