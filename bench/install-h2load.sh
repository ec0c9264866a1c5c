#!/usr/bin/env bash
# Installs h2load (Debian/Ubuntu package nghttp2-client), the HTTP/2 load generator that
# `npm run bench` drives with one fixed Check request, unless it is already on PATH.
# Needs root (or passwordless sudo) for apt-get; otherwise it says what to run and exits 1.
set -euo pipefail

if command -v h2load >/dev/null 2>&1; then
  echo "h2load already installed: $(command -v h2load)"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-h2load: no apt-get here; install nghttp2's h2load with your package manager (e.g. brew install nghttp2) and rerun" >&2
  exit 1
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    echo "install-h2load: run as root: apt-get update && apt-get install -y nghttp2-client" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends nghttp2-client
h2load --version
