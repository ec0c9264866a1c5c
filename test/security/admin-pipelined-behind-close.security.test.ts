import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ADMIN_TOKEN, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { closedByServer, openSocket } from "../harness/sockets.js";

// On the admin port an answer given with the body unread (a probe with a body; a call refused
// before its body is read) closes its connection: "Connection: close", then a lingering close.
// Node's parser still reads what arrives behind it, and handed a pipelined KeyAdmin call to the
// handler: a CreateKey was admitted and run (the key created) while its answer, the key's secret,
// could never be sent. A request read behind a connection's last answer now runs nothing.

/** Far longer than an answer and the lingering close (2 s) need. */
const DEADLINE_MS = 8_000;

// One account a case: the basic plan holds one active key, so a key one case created would make
// the next case's CreateKey fail for that reason instead.
const OWNERS = ["behind-probe", "behind-refusal", "keep-alive"];

let kg: TestKeygate;
beforeAll(async () => {
  kg = await startKeygate({ env: { KEYGATE_REQUEST_TIMEOUT_SECONDS: "120", KEYGATE_IDLE_TIMEOUT_SECONDS: "300" } });
  for (const ownerId of OWNERS) await kg.admin.upsertAccount({ ownerId, plan: "basic" });
});
afterAll(async () => {
  await kg.stop();
});

/** A CreateKey for a key of `ownerId`, as Connect JSON over HTTP/1.1. */
function createKey(ownerId: string): string {
  const json = JSON.stringify({ ownerId, name: "pipelined" });
  return `POST /keygate.v1.KeyAdmin/CreateKey HTTP/1.1\r\nHost: keygate\r\nAuthorization: Bearer ${ADMIN_TOKEN}\r\nContent-Type: application/json\r\nContent-Length: ${json.length}\r\n\r\n${json}`;
}

/** Writes `text` on one connection: the status lines that came back before the server closed it, and the keys `ownerId` has. */
async function exchange(text: string, ownerId: string): Promise<{ answered: string[]; created: number }> {
  const socket = await openSocket(kg.ports.admin);
  const closed = closedByServer(socket, DEADLINE_MS);
  socket.write(text);
  const answered = (await closed).received.toString("latin1").match(/^HTTP\/1\.1 \d{3} [^\r]*/gm) ?? [];
  const created = (await kg.admin.listKeys({ ownerId })).keys.length;
  return { answered, created };
}

describe("admin port security: a KeyAdmin call pipelined behind a closing answer is not run", () => {
  it("POST /healthz with a 1-byte body, then a CreateKey: the probe answered, no key created", async () => {
    const text = `POST /healthz HTTP/1.1\r\nHost: keygate\r\nContent-Length: 1\r\n\r\nx${createKey("behind-probe")}`;
    expect(await exchange(text, "behind-probe")).toEqual({ answered: ["HTTP/1.1 200 OK"], created: 0 });
  });

  it("a call with a wrong token and a body, refused unread, then a CreateKey with the right one: the refusal answered, no key created", async () => {
    const refused = "POST /keygate.v1.KeyAdmin/GetAccount HTTP/1.1\r\nHost: keygate\r\nAuthorization: Bearer not-the-admin-token-0123456789abcdef\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
    expect(await exchange(refused + createKey("behind-refusal"), "behind-refusal")).toEqual({ answered: ["HTTP/1.1 401 Unauthorized"], created: 0 });
  });

  it("happy: GET /healthz, then a CreateKey asking to close, on one keep-alive connection: both answered, the key created", async () => {
    const text = `GET /healthz HTTP/1.1\r\nHost: keygate\r\n\r\n${createKey("keep-alive").replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n")}`;
    expect(await exchange(text, "keep-alive")).toEqual({ answered: ["HTTP/1.1 200 OK", "HTTP/1.1 200 OK"], created: 1 });
  });
});
