#!/usr/bin/env bash
# Installs the tools test/unit/deploy-manifests.test.ts runs on deploy/k8s, offline once cached,
# into ${KEYGATE_CACHE_DIR:-$HOME/.cache/keygate}/bin:
#   kustomize             sigs.k8s.io/kustomize/kustomize/v5, built with `go install` (renders
#                         base, dev and prod; no kubectl needed)
#   helm                  helm.sh/helm/v4, built with `go install` (renders deploy/helm/keygate for
#                         test/unit/helm-chart.test.ts)
#   kubernetes-validate   the PyPI package, in its own virtualenv: a JSON-schema validator that
#                         ships the Kubernetes schemas, so validation needs no download
# Why not kubeconform: it fetches its schemas from GitHub at run time, and the schemas inside
# kubernetes-validate use cross-file $refs (_definitions.json) rather than kubeconform's
# standalone layout.
#
# Idempotent: each tool is reinstalled only when the cached one reports another version.
set -euo pipefail

KUSTOMIZE_VERSION=v5.8.2          # v5.8.3 needs Go 1.27
KUBERNETES_VALIDATE_VERSION=1.37.0
HELM_VERSION=v4.3.2
CACHE_DIR="${KEYGATE_CACHE_DIR:-$HOME/.cache/keygate}"
BIN="$CACHE_DIR/bin"
VENV="$CACHE_DIR/kubernetes-validate-$KUBERNETES_VALIDATE_VERSION"

log() { printf 'install-k8s-tools: %s\n' "$*"; }
die() { printf 'install-k8s-tools: %s\n' "$*" >&2; exit 1; }

mkdir -p "$BIN"

# ---- kustomize --------------------------------------------------------------------------------
if [ "$("$BIN/kustomize" version 2>/dev/null || true)" = "$KUSTOMIZE_VERSION" ]; then
  log "kustomize $KUSTOMIZE_VERSION already installed"
else
  GO=$(command -v go || true)
  [ -n "$GO" ] || { [ -x /usr/local/go/bin/go ] && GO=/usr/local/go/bin/go; }
  [ -n "$GO" ] || die "go is required to build kustomize"
  log "go install sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION"
  # GOTOOLCHAIN=local: build with the machine's Go, never fetch another toolchain.
  GOTOOLCHAIN=local GOBIN="$BIN" "$GO" install "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION"
  [ "$("$BIN/kustomize" version)" = "$KUSTOMIZE_VERSION" ] || die "kustomize did not report $KUSTOMIZE_VERSION"
fi

# ---- helm ---------------------------------------------------------------------------------------
# A `go install`ed helm reports no release in `helm version`; the module version is in the binary.
helm_module_version() { go_bin version -m "$BIN/helm" 2>/dev/null | awk '$1 == "mod" { print $3 }'; }
go_bin() {
  local go
  go=$(command -v go || true)
  [ -n "$go" ] || { [ -x /usr/local/go/bin/go ] && go=/usr/local/go/bin/go; }
  [ -n "$go" ] || die "go is required to build helm"
  "$go" "$@"
}
if [ -x "$BIN/helm" ] && [ "$(helm_module_version)" = "$HELM_VERSION" ]; then
  log "helm $HELM_VERSION already installed"
else
  log "go install helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
  GOTOOLCHAIN=local GOBIN="$BIN" go_bin install "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
  [ "$(helm_module_version)" = "$HELM_VERSION" ] || die "helm did not build as $HELM_VERSION"
fi

# ---- kubernetes-validate ----------------------------------------------------------------------
if [ "$("$VENV/bin/kubernetes-validate" --version 2>/dev/null || true)" = "$KUBERNETES_VALIDATE_VERSION" ]; then
  log "kubernetes-validate $KUBERNETES_VALIDATE_VERSION already installed"
else
  log "pip install kubernetes-validate==$KUBERNETES_VALIDATE_VERSION into $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV" || die "python3 -m venv failed (Debian's python3 needs python3-venv)"
  # A half-made virtualenv fails the version check above next time and is made again.
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
    || { rm -rf "$VENV"; die "pip install kubernetes-validate failed"; }
fi
ln -sf "$VENV/bin/kubernetes-validate" "$BIN/kubernetes-validate"
"$BIN/kubernetes-validate" --version >/dev/null || die "kubernetes-validate does not run"
log "ready in $BIN: kustomize $("$BIN/kustomize" version), helm $(helm_module_version), kubernetes-validate $("$BIN/kubernetes-validate" --version)"
