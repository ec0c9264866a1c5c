#!/usr/bin/env bash
# Builds bench/rategen, the open-loop load generator `npm run bench` measures fixed-rate latency
# with, into the same cache as ghz. The binary is named by a hash of its source, so a changed
# source builds a new one and an unchanged one is kept (idempotent). Needs Go; the modules come
# from Go's module cache, else from the module proxy.
#   bash bench/install-rategen.sh               build unless built
#   bash bench/install-rategen.sh --print-path  print where the binary of this source goes
set -euo pipefail

SRC="$(cd "$(dirname "$0")/rategen" && pwd)"
CACHE_DIR="${KEYGATE_CACHE_DIR:-$HOME/.cache/keygate}"
BIN_DIR="$CACHE_DIR/bin"

# The same hash as rategenInstallPath() in bench/rategen.ts: sha256 over sha256sum's lines for
# go.mod, go.sum and every .go file, in C sort order; the first 16 hex digits.
HASH="$(cd "$SRC" && find . -maxdepth 1 -type f \( -name go.mod -o -name go.sum -o -name '*.go' \) -printf '%f\n' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)"
RATEGEN="$BIN_DIR/rategen-$HASH"

if [ "${1:-}" = "--print-path" ]; then
  echo "$RATEGEN"
  exit 0
fi

if [ -x "$RATEGEN" ]; then
  echo "rategen already built: $RATEGEN"
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  echo "install-rategen: 'go' is not on PATH; install Go (https://go.dev/dl/ or Debian's golang-go) and rerun" >&2
  exit 1
fi

mkdir -p "$BIN_DIR"
echo "building rategen into $RATEGEN (go build)"
TMP="$RATEGEN.tmp.$$"
trap 'rm -f "$TMP"' EXIT
(cd "$SRC" && GOTOOLCHAIN=local CGO_ENABLED=0 go build -trimpath -o "$TMP" .)
mv "$TMP" "$RATEGEN"
# Binaries of earlier sources go after a week; not at once, since another checkout on the same
# machine may be running its own.
find "$BIN_DIR" -maxdepth 1 -type f -name 'rategen-*' ! -name "rategen-$HASH" -mtime +7 -delete
echo "rategen built: $RATEGEN"
