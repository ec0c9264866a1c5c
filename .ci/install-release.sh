#!/usr/bin/env bash
# Installs and builds an earlier keygate release, for test/e2e/rolling-upgrade.test.ts, which runs
# it beside this keygate: its committed sources (test/fixtures/upgrade/<commit>/release-src.tar.gz)
# with the dependency tree its own package-lock.json pins, built with its own TypeScript, into
# ${KEYGATE_CACHE_DIR:-$HOME/.cache/keygate}/release-<commit>.
#   bash .ci/install-release.sh [commit ...]      (default: every release under test/fixtures/upgrade)
#
# The release pins better-sqlite3, which this keygate no longer uses. Install scripts are skipped:
# on Node 24 the release loads better-sqlite3 13, which ships prebuilt Node-API binaries, so nothing
# compiles. Idempotent: a stamp holds the archive's hash, so a second run exits at once; a build is
# made in a staging directory and moved into place only when complete.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE_DIR="${KEYGATE_CACHE_DIR:-$HOME/.cache/keygate}"

log() { printf 'install-release: %s\n' "$*"; }
die() { printf 'install-release: %s\n' "$*" >&2; exit 1; }

install_one() {
  local commit="$1"
  local archive="test/fixtures/upgrade/$commit/release-src.tar.gz"
  local target="$CACHE_DIR/release-$commit"
  [ -f "$archive" ] || die "no sources of release $commit at $archive"
  local want
  want=$(sha256sum "$archive" | cut -d' ' -f1)
  if [ -f "$target/.installed" ] && [ "$(cat "$target/.installed")" = "$want" ] && [ -f "$target/dist/cli.js" ]; then
    log "release $commit already built in $target (nothing to do)"
    return
  fi
  local started stage
  started=$(date +%s)
  mkdir -p "$CACHE_DIR"
  stage=$(mktemp -d "$CACHE_DIR/.release-$commit.XXXXXX")
  # shellcheck disable=SC2064 # the staging directory is known now
  trap "rm -rf '$stage'" RETURN
  tar -xzf "$archive" -C "$stage"
  log "npm ci for release $commit (its own lockfile, install scripts skipped)"
  (cd "$stage" && npm ci --ignore-scripts --no-audit --no-fund >/dev/null) || die "npm ci failed for release $commit"
  log "building release $commit with its own TypeScript"
  (cd "$stage" && node_modules/.bin/tsc -p tsconfig.build.json) || die "building release $commit failed"
  printf '%s\n' "$want" > "$stage/.installed"
  rm -rf "$target"
  mv "$stage" "$target"
  log "release $commit built in $target in $(( $(date +%s) - started )) s"
}

if [ "$#" -gt 0 ]; then
  for commit in "$@"; do install_one "$commit"; done
else
  for archive in test/fixtures/upgrade/*/release-src.tar.gz; do
    [ -f "$archive" ] || continue
    install_one "$(basename "$(dirname "$archive")")"
  done
fi
