import { randomBytes } from "node:crypto";
import { chmodSync, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";

/** The pepper and admin tokens in force, and whether this start generated the token. */
export interface Secrets {
  pepper: string;
  adminTokens: string[];
  /** Set on the start that created the admin-token file, and on later ones until one printed it. */
  generatedAdminToken: string | null;
}

/** Creates the data directory, owner-only. */
export function ensureDataDir(dataDir: string): void {
  mkdirSync(dataDir, { recursive: true, mode: 0o700 });
}

function readOrCreate(path: string, make: () => string): { value: string; created: boolean } {
  if (existsSync(path)) {
    const value = readFileSync(path, "utf8").trim();
    if (value === "") throw new Error(`${path} is empty; delete it to generate a new one`);
    return { value, created: false };
  }
  const value = make();
  // "wx" fails if another process created the file first, so two starts never disagree.
  writeFileSync(path, `${value}\n`, { mode: 0o600, flag: "wx" });
  chmodSync(path, 0o600);
  return { value, created: true };
}

/**
 * Embedded-mode secrets: environment values win; otherwise the pepper and one admin token
 * are generated into the data directory with mode 0600 on first start.
 */
export function loadSecrets(dataDir: string, fromEnv: { pepper: string | undefined; adminTokens: string[] | undefined }): Secrets {
  const pepper = fromEnv.pepper ?? readOrCreate(join(dataDir, "pepper"), () => randomBytes(32).toString("base64url")).value;
  if (fromEnv.adminTokens !== undefined) return { pepper, adminTokens: fromEnv.adminTokens, generatedAdminToken: null };
  const token = readOrCreate(join(dataDir, "admin-token"), () => `kgadm_${randomBytes(32).toString("base64url")}`);
  // Until a start has printed the generated token, every start prints it: a first start that
  // fails (a busy port, say) must not leave a token nobody was shown.
  const unshown = join(dataDir, UNSHOWN_MARKER);
  if (token.created) writeFileSync(unshown, "", { mode: 0o600 });
  return { pepper, adminTokens: [token.value], generatedAdminToken: token.created || existsSync(unshown) ? token.value : null };
}

const UNSHOWN_MARKER = "admin-token.unshown";

/** Records that the generated admin token has been printed, so later starts do not print it. */
export function markAdminTokenShown(dataDir: string): void {
  rmSync(join(dataDir, UNSHOWN_MARKER), { force: true });
}
