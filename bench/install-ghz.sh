#!/usr/bin/env bash
# Installs the ghz gRPC load generator that `npm run bench` drives, unless it is already there.
# Idempotent: a present binary of the pinned version is kept.
set -euo pipefail

GHZ_VERSION="v0.120.0"
CACHE_DIR="${KEYGATE_CACHE_DIR:-$HOME/.cache/keygate}"
BIN_DIR="$CACHE_DIR/bin"
GHZ="$BIN_DIR/ghz"

if [ -x "$GHZ" ]; then
  echo "ghz already installed: $GHZ"
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  echo "install-ghz: 'go' is not on PATH; install Go (https://go.dev/dl/ or Debian's golang-go) and rerun" >&2
  exit 1
fi

mkdir -p "$BIN_DIR"
echo "installing ghz $GHZ_VERSION into $BIN_DIR (go install, about 30 s)"
GOBIN="$BIN_DIR" go install "github.com/bojand/ghz/cmd/ghz@$GHZ_VERSION"
"$GHZ" --version >/dev/null
echo "ghz installed: $GHZ"
