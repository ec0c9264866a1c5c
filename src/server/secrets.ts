import { randomBytes } from "node:crypto";
import { closeSync, constants, fchmodSync, fstatSync, fsyncSync, linkSync, lstatSync, mkdirSync, openSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import type { Stats } from "node:fs";
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

const { O_CREAT, O_EXCL, O_NOFOLLOW, O_NONBLOCK, O_RDONLY, O_WRONLY } = constants;

/**
 * Refuses a data directory file (or the link at its name) that another user owns: whoever can
 * write the directory (an emptyDir is 0777, a directory another user made first) could have put it
 * there, and its content would be trusted as the pepper or a do-everything admin token. This
 * process's user and root (a Secret volume's files) may own it; names the uids, never the content.
 */
function refuseForeignOwner(path: string, what: string, owner: number): void {
  const uid = typeof process.geteuid === "function" ? process.geteuid() : null;
  if (uid === null || owner === uid || owner === 0) return;
  throw new ConfigError(
    `${path} ${what} owned by uid ${owner}, not by uid ${uid} that keygate runs as (nor root): another user may have put it there. ` +
      `Delete it, or if it is yours, chown it to the user keygate runs as`,
  );
}

/** Why `path` could not be opened for reading, as a ConfigError naming it. */
function unreadable(path: string, error: unknown, missing: string): ConfigError {
  const code = fsCode(error);
  const problem =
    code === "EACCES" || code === "EPERM"
      ? "cannot be read by this user (permission denied)"
      : code === "ENOENT"
        ? missing
        : `cannot be read (${error instanceof Error ? error.message : String(error)})`;
  return new ConfigError(`${path} ${problem}`, { cause: error });
}

function sameFile(a: Stats | undefined, b: Stats): boolean {
  return a !== undefined && a.dev === b.dev && a.ino === b.ino;
}

/**
 * Opens a secret file for reading: the file at `path` itself, or the one a symbolic link there
 * leads to, when this user or root made the link (a Kubernetes Secret volume's files are links).
 * O_NONBLOCK: a FIFO put there must not hang the start (it is refused as no regular file).
 */
function openSecretFile(path: string): { fd: number; linked: boolean } {
  try {
    return { fd: openSync(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK), linked: false };
  } catch (error) {
    if (fsCode(error) !== "ELOOP") throw unreadable(path, error, "was removed while keygate read it");
  }
  const link = lstatSync(path, { throwIfNoEntry: false });
  if (link === undefined) throw new ConfigError(`${path} was removed while keygate read it`);
  refuseForeignOwner(path, "is a symbolic link", link.uid);
  let fd: number;
  try {
    fd = openSync(path, O_RDONLY | O_NONBLOCK);
  } catch (error) {
    throw unreadable(path, error, "is a symbolic link to a file that does not exist");
  }
  // Whoever can write the directory could swap the link between the look and the open: the file
  // read must be the one the same link still leads to.
  if (!sameFile(lstatSync(path, { throwIfNoEntry: false }), link) || !sameFile(statSync(path, { throwIfNoEntry: false }), fstatSync(fd))) {
    closeSync(fd);
    throw new ConfigError(`${path} changed while keygate read it; start keygate again`);
  }
  return { fd, linked: true };
}

/**
 * The file's text, trimmed, and its mode, from one open: the owner checked is the file read. A
 * path that is there but cannot be read as a file (a directory, a file this user may not read, a
 * symbolic link to nothing) or that another user owns is refused, naming it.
 */
function readSecretFile(path: string): { value: string; mode: number } {
  const { fd, linked } = openSecretFile(path);
  try {
    const file = fstatSync(fd);
    if (file.isDirectory()) throw new ConfigError(`${path} is a directory, not a file`);
    if (!file.isFile()) throw new ConfigError(`${path} is not a regular file`);
    refuseForeignOwner(path, linked ? "is a symbolic link to a file" : "is a file", file.uid);
    return { value: readFileSync(fd, "utf8").trim(), mode: file.mode };
  } finally {
    closeSync(fd);
  }
}

/** link(2)'s answers on a file system without hard links (exFAT/FAT, some FUSE and SMB mounts). */
const NO_HARD_LINKS = new Set(["EPERM", "ENOTSUP", "EOPNOTSUPP", "ENOSYS"]);

/** How long a start that lost the race to create a secret file waits for the winner's write, at most. */
const WINNER_WRITE_WAIT_MS = 1000;

function errorCode(error: unknown): string {
  return error instanceof Error && "code" in error && typeof error.code === "string" ? error.code : "";
}

/** Writes `text` to a new file at `fd` with mode 0600 (the umask must not widen it), synced. */
function writeSecret(fd: number, text: string): void {
  try {
    fchmodSync(fd, 0o600);
    writeFileSync(fd, text);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/**
 * Creates `path` holding `text` unless something (a file, a link) is there already: false then.
 * Written whole under a name of its own, then linked at `path`, so the file is never seen empty or
 * half written there. Where the file system has no hard links it is created in place (O_EXCL).
 */
function createSecretFile(path: string, text: string): boolean {
  const temporary = `${path}.${process.pid}.${randomBytes(6).toString("hex")}.tmp`;
  try {
    writeSecret(openSync(temporary, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0o600), text);
    linkSync(temporary, path);
    return true;
  } catch (error) {
    if (errorCode(error) === "EEXIST") return false;
    if (!NO_HARD_LINKS.has(errorCode(error))) throw error;
  } finally {
    rmSync(temporary, { force: true });
  }
  let fd: number;
  try {
    fd = openSync(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0o600);
  } catch (error) {
    if (errorCode(error) === "EEXIST") return false;
    throw error;
  }
  writeSecret(fd, text);
  return true;
}

/** The winner's file, once its value is there: created in place (no hard links), it is empty until written. */
function readWinnersFile(path: string): { value: string; mode: number } {
  const waitUntil = performance.now() + WINNER_WRITE_WAIT_MS;
  const pause = new Int32Array(new SharedArrayBuffer(4));
  for (;;) {
    const existing = readSecretFile(path);
    if (existing.value !== "" || performance.now() >= waitUntil) return existing;
    Atomics.wait(pause, 0, 0, 10);
  }
}

function readOrCreate(path: string, make: () => string): { value: string; mode: number; created: boolean } {
  // lstat, not exists: a link to nothing is there (and refused), not missing (and generated).
  if (lstatSync(path, { throwIfNoEntry: false }) === undefined) {
    const value = make();
    // Keygates sharing the data directory may start together: the one that loses uses the
    // winner's value, so two starts never disagree.
    if (createSecretFile(path, `${value}\n`)) return { value, mode: 0o600, created: true };
  }
  // Another start's file, or an earlier one's: created in place (no hard links), it is empty until written.
  const { value, mode } = readWinnersFile(path);
  if (value === "") throw new Error(`${path} is empty; delete it to generate a new one`);
  return { value, mode, created: false };
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
  if (token.created) createMarker(unshown);
  return {
    ...pepperPart,
    adminTokens: [token.value],
    generatedAdminToken: token.created || markerPresent(unshown) ? token.value : null,
    adminTokenFile: file,
    adminTokenFileProblems: modeProblems(token.mode),
    ignoredAdminTokenFile: null,
  };
}

/** The pepper of `file`, generated into it when missing, unless the data directory's database holds keys. */
function filePepper(file: string, holdsKeys: () => boolean): { pepper: string; pepperFile: string; pepperFileProblems: string[] } {
  const { value: pepper, mode } = readOrCreate(file, () => {
    if (holdsKeys()) {
      throw new ConfigError(
        `${file} is missing but the data directory holds keys: a new pepper would make every key unknown. ` +
          "Restore it from a backup, or set KEYGATE_PEPPER to the pepper the keys were made with",
      );
    }
    return randomBytes(32).toString("base64url");
  });
  return { pepper, pepperFile: file, pepperFileProblems: pepperProblems(pepper, mode) };
}

/** What makes a pepper file weaker than a generated one; never the pepper itself. */
function pepperProblems(pepper: string, mode: number): string[] {
  const problems: string[] = [];
  if (pepper.length < PEPPER_MIN_LENGTH) problems.push(`shorter than ${PEPPER_MIN_LENGTH} characters (KEYGATE_PEPPER's minimum)`);
  return [...problems, ...modeProblems(mode)];
}

/** A secret file that group or others may read, as a problem naming its mode; never its content. */
function modeProblems(fileMode: number): string[] {
  // The mode of the file read (through a link, the file it leads to): what decides who can read it.
  const mode = fileMode & 0o777;
  return (mode & 0o044) !== 0 ? [`readable by group or others (mode ${mode.toString(8).padStart(4, "0")}; chmod 600 it)`] : [];
}

const UNSHOWN_MARKER = "admin-token.unshown";

/** The error for a symbolic link at the name of a file keygate makes itself: it never writes through one. */
function linkAtMarker(path: string, cause?: unknown): ConfigError {
  return new ConfigError(`${path} is a symbolic link; keygate makes this file itself and never follows a link there: delete it`, { cause });
}

/**
 * Creates the marker, or leaves one there alone (an earlier start's token was never shown, and
 * the admin-token file was deleted since): no O_TRUNC, so nothing already at the name is changed.
 */
function createMarker(path: string): void {
  try {
    closeSync(openSync(path, O_WRONLY | O_CREAT | O_NOFOLLOW | O_NONBLOCK, 0o600));
  } catch (error) {
    throw fsCode(error) === "ELOOP" ? linkAtMarker(path, error) : error;
  }
}

/** Whether the marker is there; one another user put there would have the token printed again, so it is refused. */
function markerPresent(path: string): boolean {
  const marker = lstatSync(path, { throwIfNoEntry: false });
  if (marker === undefined) return false;
  if (marker.isSymbolicLink()) throw linkAtMarker(path);
  refuseForeignOwner(path, "is a file", marker.uid);
  return true;
}

/** Records that the generated admin token has been printed, so later starts do not print it. */
export function markAdminTokenShown(dataDir: string): void {
  rmSync(join(dataDir, UNSHOWN_MARKER), { force: true });
}
