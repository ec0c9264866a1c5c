import { randomBytes } from "node:crypto";
import { chmodSync, existsSync, lstatSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { ADMIN_TOKEN_MIN_LENGTH } from "../admin/permissions.js";
import { ConfigError } from "../config.js";

/** The pepper and admin tokens in force, and whether this start generated the token. */
export interface Secrets {
  pepper: string;
  /** The file the pepper was read from or generated into; null when it came from KEYGATE_PEPPER. */
  pepperFile: string | null;
  /**
   * What is wrong with a pepper file that is used anyway (shorter than KEYGATE_PEPPER may be,
   * readable by others): the store's keys were hashed with it, so refusing it would refuse them all.
   */
  pepperFileProblems: string[];
  adminTokens: string[];
  /** Set on the start that created the admin-token file, and on later ones until one printed it. */
  generatedAdminToken: string | null;
  /** The data directory's admin-token file when the token in force came from it; otherwise null. */
  adminTokenFile: string | null;
  /** What is wrong with that file that is not worth refusing it (readable by others); never the token. */
  adminTokenFileProblems: string[];
  /** A data directory admin-token file left unused because KEYGATE_ADMIN_TOKENS_FILE is set; otherwise null. */
  ignoredAdminTokenFile: string | null;
}

/** Creates the data directory, owner-only. */
export function ensureDataDir(dataDir: string): void {
  mkdirSync(dataDir, { recursive: true, mode: 0o700 });
}

/** KEYGATE_PEPPER's minimum length (src/config.ts), which a generated pepper file far exceeds. */
export const PEPPER_MIN_LENGTH = 32;

/** The system error code of a file system error, or "". */
function fsCode(error: unknown): string {
  return error instanceof Error && "code" in error && typeof error.code === "string" ? error.code : "";
}

/**
 * The file's text, trimmed. A path that is there but cannot be read as a file (a directory, a
 * file this user may not read, a symbolic link to nothing) is refused, naming it. A symbolic link
 * to a file is read through: a Kubernetes Secret volume's files are links.
 */
function readSecretFile(path: string): string {
  try {
    return readFileSync(path, "utf8").trim();
  } catch (error) {
    const code = fsCode(error);
    const problem =
      code === "EISDIR"
        ? "is a directory, not a file"
        : code === "EACCES" || code === "EPERM"
          ? "cannot be read by this user (permission denied)"
          : code === "ENOENT"
            ? "is a symbolic link to a file that does not exist"
            : `cannot be read (${error instanceof Error ? error.message : String(error)})`;
    throw new ConfigError(`${path} ${problem}`, { cause: error });
  }
}

function readOrCreate(path: string, make: () => string): { value: string; created: boolean } {
  // lstat, not exists: a link to nothing is there (and refused), not missing (and generated).
  if (lstatSync(path, { throwIfNoEntry: false }) !== undefined) {
    const value = readSecretFile(path);
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
 * With KEYGATE_ADMIN_TOKENS_FILE alone, its scoped tokens are the only admin tokens.
 */
export function loadSecrets(
  dataDir: string,
  fromEnv: { pepper: string | undefined; adminTokens: string[] | undefined; adminTokensFile: string | undefined },
  holdsKeys: () => boolean = () => false,
): Secrets {
  const pepperPart =
    fromEnv.pepper === undefined ? filePepper(join(dataDir, "pepper"), holdsKeys) : { pepper: fromEnv.pepper, pepperFile: null, pepperFileProblems: [] };
  const noFile = { adminTokenFile: null, adminTokenFileProblems: [], ignoredAdminTokenFile: null };
  if (fromEnv.adminTokens !== undefined) return { ...pepperPart, adminTokens: fromEnv.adminTokens, generatedAdminToken: null, ...noFile };
  const file = join(dataDir, "admin-token");
  // A do-everything token beside scoped ones would be one that no edit of their file can revoke.
  if (fromEnv.adminTokensFile !== undefined) {
    const present = lstatSync(file, { throwIfNoEntry: false }) !== undefined;
    return { ...pepperPart, adminTokens: [], generatedAdminToken: null, ...noFile, ignoredAdminTokenFile: present ? file : null };
  }
  const token = readOrCreate(file, () => `kgadm_${randomBytes(32).toString("base64url")}`);
  // Only a hand-written file can be short; every other admin token must have this length.
  if (token.value.length < ADMIN_TOKEN_MIN_LENGTH) {
    throw new ConfigError(`${file} holds an admin token shorter than ${ADMIN_TOKEN_MIN_LENGTH} characters; delete it to generate a new one`);
  }
  // Until a start has printed the generated token, every start prints it: a first start that
  // fails (a busy port, say) must not leave a token nobody was shown.
  const unshown = join(dataDir, UNSHOWN_MARKER);
  if (token.created) writeFileSync(unshown, "", { mode: 0o600 });
  return {
    ...pepperPart,
    adminTokens: [token.value],
    generatedAdminToken: token.created || existsSync(unshown) ? token.value : null,
    adminTokenFile: file,
    adminTokenFileProblems: modeProblems(file),
    ignoredAdminTokenFile: null,
  };
}

/** The pepper of `file`, generated into it when missing, unless the data directory's database holds keys. */
function filePepper(file: string, holdsKeys: () => boolean): { pepper: string; pepperFile: string; pepperFileProblems: string[] } {
  const { value: pepper } = readOrCreate(file, () => {
    if (holdsKeys()) {
      throw new ConfigError(
        `${file} is missing but the data directory holds keys: a new pepper would make every key unknown. ` +
          "Restore it from a backup, or set KEYGATE_PEPPER to the pepper the keys were made with",
      );
    }
    return randomBytes(32).toString("base64url");
  });
  return { pepper, pepperFile: file, pepperFileProblems: pepperProblems(file, pepper) };
}

/** What makes a pepper file weaker than a generated one; never the pepper itself. */
function pepperProblems(file: string, pepper: string): string[] {
  const problems: string[] = [];
  if (pepper.length < PEPPER_MIN_LENGTH) problems.push(`shorter than ${PEPPER_MIN_LENGTH} characters (KEYGATE_PEPPER's minimum)`);
  return [...problems, ...modeProblems(file)];
}

/** A secret file that group or others may read, as a problem naming its mode; never its content. */
function modeProblems(file: string): string[] {
  // The mode of the file a link leads to: what decides who can read it.
  const mode = statSync(file).mode & 0o777;
  return (mode & 0o044) !== 0 ? [`readable by group or others (mode ${mode.toString(8).padStart(4, "0")}; chmod 600 it)`] : [];
}

const UNSHOWN_MARKER = "admin-token.unshown";

/** Records that the generated admin token has been printed, so later starts do not print it. */
export function markAdminTokenShown(dataDir: string): void {
  rmSync(join(dataDir, UNSHOWN_MARKER), { force: true });
}
