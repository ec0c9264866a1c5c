import { randomBytes } from "node:crypto";
import { chmodSync, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { ConfigError } from "../config.js";

/** The pepper and admin tokens in force, and whether this start generated the token. */
export interface Secrets {
  pepper: string;
  /** The file the pepper was read from or generated into; null when it came from KEYGATE_PEPPER. */
  pepperFile: string | null;
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
 * are generated into the data directory with mode 0600 on first start. A pepper is never
 * generated beside a database that `holdsKeys` says has keys: they would all be unknown.
 */
export function loadSecrets(
  dataDir: string,
  fromEnv: { pepper: string | undefined; adminTokens: string[] | undefined },
  holdsKeys: () => boolean = () => false,
): Secrets {
  const { pepper, pepperFile } = fromEnv.pepper === undefined ? filePepper(join(dataDir, "pepper"), holdsKeys) : { pepper: fromEnv.pepper, pepperFile: null };
  if (fromEnv.adminTokens !== undefined) return { pepper, pepperFile, adminTokens: fromEnv.adminTokens, generatedAdminToken: null };
  const token = readOrCreate(join(dataDir, "admin-token"), () => `kgadm_${randomBytes(32).toString("base64url")}`);
  // Until a start has printed the generated token, every start prints it: a first start that
  // fails (a busy port, say) must not leave a token nobody was shown.
  const unshown = join(dataDir, UNSHOWN_MARKER);
  if (token.created) writeFileSync(unshown, "", { mode: 0o600 });
  return { pepper, pepperFile, adminTokens: [token.value], generatedAdminToken: token.created || existsSync(unshown) ? token.value : null };
}

/** The pepper of `file`, generated into it when missing, unless the data directory's database holds keys. */
function filePepper(file: string, holdsKeys: () => boolean): { pepper: string; pepperFile: string } {
  const pepper = readOrCreate(file, () => {
    if (holdsKeys()) {
      throw new ConfigError(
        `${file} is missing but the data directory holds keys: a new pepper would make every key unknown. ` +
          "Restore it from a backup, or set KEYGATE_PEPPER to the pepper the keys were made with",
      );
    }
    return randomBytes(32).toString("base64url");
  }).value;
  return { pepper, pepperFile: file };
}

const UNSHOWN_MARKER = "admin-token.unshown";

/** Records that the generated admin token has been printed, so later starts do not print it. */
export function markAdminTokenShown(dataDir: string): void {
  rmSync(join(dataDir, UNSHOWN_MARKER), { force: true });
}
