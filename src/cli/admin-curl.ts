import { isIPv6 } from "node:net";

/** `text` as one POSIX shell word: in single quotes, each `'` written as `'\''`. */
export function shellQuote(text: string): string {
  return `'${text.replaceAll("'", `'\\''`)}'`;
}

// "::", "0::0", "0:0:0:0:0:0:0:0": the IPv6 wildcard in any of its spellings.
const IPV6_UNSPECIFIED = /^[0:]+$/;

/**
 * The URL host that reaches a listener bound to `host`: loopback for a wildcard (0.0.0.0, ::), an
 * IPv6 address in brackets (its zone's "%" escaped, as URLs spell it), anything else as it is.
 */
export function reachableHost(host: string): string {
  if (host === "0.0.0.0") return "127.0.0.1";
  if (!isIPv6(host)) return host;
  if (IPV6_UNSPECIFIED.test(host)) return "[::1]";
  return `[${host.replace("%", "%25")}]`;
}

/** Where the admin listener is and how it is reached: what the first start's curl line needs. */
export interface AdminCurlTarget {
  /** KEYGATE_HOST, the address every listener is bound to. */
  host: string;
  port: number;
  /** The generated admin token's file. */
  tokenFile: string;
  /** Set when the admin listener serves TLS. */
  tls: { certFile: string; clientAuth: boolean } | null;
}

/**
 * The `Use it: curl …` line the first start prints, pasteable into a POSIX shell as it is, and the
 * notes a TLS admin listener needs. A CreateKey call for user_1.
 */
export function adminCurlLines(target: AdminCurlTarget): string[] {
  const scheme = target.tls === null ? "http" : "https";
  // curl trusts a certificate given with --cacert as it is (a partial chain), so the listener's
  // own certificate works whether it is self-signed or signed by a CA the shell does not know.
  const cacert = target.tls === null ? "" : `--cacert ${shellQuote(target.tls.certFile)} `;
  const lines = [
    `Use it: curl ${cacert}-H "Authorization: Bearer $(cat ${shellQuote(target.tokenFile)})" -H 'content-type: application/json' ` +
      `-d '{"ownerId":"user_1","name":"first key"}' ${scheme}://${reachableHost(target.host)}:${target.port}/keygate.v1.KeyAdmin/CreateKey`,
  ];
  if (target.tls !== null) {
    lines.push("  (the admin port serves TLS: --cacert names its certificate, KEYGATE_TLS_CERT_FILE; the CA that signed it works as well)");
    if (target.tls.clientAuth) lines.push("  (the admin port asks for a client certificate, KEYGATE_TLS_CLIENT_AUTH_LISTENERS: add --cert and --key with one its CA signed)");
  }
  return lines;
}
