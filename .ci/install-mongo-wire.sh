#!/usr/bin/env bash
# Installs the MongoDB-wire test server: mongo-java-server (in-memory backend) from Maven
# Central, plus the compiled launcher test/harness/mongo-wire/MongoWireServer.java, into a cache
# directory reused across runs: ${KEYGATE_CACHE_DIR:-$HOME/.cache/keygate}/mongo-java-server-VERSION.
#
# Idempotent: a stamp file records a hash of the version, the dependency list and the launcher
# source, so a fresh clone (whose files all have new mtimes) still finds the cached install and
# exits at once. Anything else is built in a staging directory and moved into place only when
# complete, so a failed or interrupted run never leaves a half-installed server behind.
#
# Why not FerretDB: FerretDB 1.24.0 (SQLite backend) loses updates under concurrency: 50
# concurrent `updateOne({_id, n: {$lt: 1}}, {$inc: {n: 1}})` reported up to 13 successes for
# one slot. mongo-java-server serialises them (exactly 1), which keygate's key cap relies on.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=1.46.0
SLF4J_VERSION=2.0.16
CACHE_DIR="${KEYGATE_CACHE_DIR:-$HOME/.cache/keygate}"
TARGET="$CACHE_DIR/mongo-java-server-$VERSION"
LAUNCHER=test/harness/mongo-wire/MongoWireServer.java
STAMP="$TARGET/.installed"

log() { printf 'install-mongo-wire: %s\n' "$*"; }
die() { printf 'install-mongo-wire: %s\n' "$*" >&2; exit 1; }

[ -f "$LAUNCHER" ] || die "launcher source $LAUNCHER is missing"

want=$(printf '%s\n%s\n' "$VERSION" "$SLF4J_VERSION" | cat - "$LAUNCHER" | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -f "$TARGET/classes/MongoWireServer.class" ]; then
  log "mongo-java-server $VERSION already installed in $TARGET (nothing to do)"
  exit 0
fi

for tool in java javac mvn sha256sum; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is required (Debian: default-jdk-headless maven coreutils)"
done

started=$(date +%s)
log "installing mongo-java-server $VERSION into $TARGET"
mkdir -p "$CACHE_DIR"
stage=$(mktemp -d "$CACHE_DIR/.mongo-java-server-$VERSION.XXXXXX")
work=$(mktemp -d)
trap 'rm -rf "$work" "$stage"' EXIT

cat > "$work/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>keygate.test</groupId>
  <artifactId>mongo-wire</artifactId>
  <version>1</version>
  <dependencies>
    <dependency>
      <groupId>de.bwaldvogel</groupId>
      <artifactId>mongo-java-server</artifactId>
      <version>$VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-nop</artifactId>
      <version>$SLF4J_VERSION</version>
    </dependency>
  </dependencies>
</project>
POM

mkdir -p "$stage/lib" "$stage/classes"
log "fetching jars from Maven Central (mvn dependency:copy-dependencies)"
mvn -B -q -Dstyle.color=never -f "$work/pom.xml" dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$stage/lib" ||
  die "mvn could not fetch de.bwaldvogel:mongo-java-server:$VERSION and its dependencies"
[ -f "$stage/lib/mongo-java-server-memory-backend-$VERSION.jar" ] || die "the memory backend jar is missing after mvn"

log "compiling $LAUNCHER"
javac -d "$stage/classes" -cp "$stage/lib/*" "$LAUNCHER" || die "javac failed on $LAUNCHER"
printf '%s\n' "$want" > "$stage/.installed"

rm -rf "$TARGET"
mv "$stage" "$TARGET"
chmod 755 "$TARGET"
log "installed $(find "$TARGET/lib" -name '*.jar' | wc -l) jars and the launcher in $(( $(date +%s) - started )) s"
