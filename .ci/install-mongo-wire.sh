#!/usr/bin/env bash
# Installs the MongoDB-wire test server: mongo-java-server (in-memory backend) from Maven
# Central, plus a compiled launcher, into a cache directory reused across runs.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=1.46.0
CACHE_DIR="${KEYGATE_CACHE_DIR:-$HOME/.cache/keygate}"
TARGET="$CACHE_DIR/mongo-java-server-$VERSION"
LAUNCHER=test/harness/mongo-wire/MongoWireServer.java

if [ -f "$TARGET/classes/MongoWireServer.class" ] && [ "$TARGET/classes/MongoWireServer.class" -nt "$LAUNCHER" ]; then
  echo "mongo-java-server $VERSION already installed in $TARGET"
  exit 0
fi

for tool in java javac mvn; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "install-mongo-wire: $tool is required (Debian: default-jdk-headless maven)" >&2
    exit 1
  fi
done

echo "installing mongo-java-server $VERSION into $TARGET"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
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
      <version>2.0.16</version>
    </dependency>
  </dependencies>
</project>
POM
rm -rf "$TARGET"
mkdir -p "$TARGET/lib" "$TARGET/classes"
mvn -q -f "$work/pom.xml" dependency:copy-dependencies -DoutputDirectory="$TARGET/lib"
javac -d "$TARGET/classes" -cp "$TARGET/lib/*" "$LAUNCHER"
echo "installed: $(ls "$TARGET/lib" | wc -l) jars and the launcher"
