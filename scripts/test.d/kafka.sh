#!/usr/bin/env bash
# Fetches the Apache Kafka broker (KRaft) jars the audit tests run against: the artifacts
# listed in tests/kafka/pom.xml and their runtime dependencies, from Maven Central, into
# tests/kafka/target/jars (or $RT_KAFKA_JARS). Skipped when the cached copy matches the pom.
# The broker itself is started by the `kafka_broker` fixture (tests/harness/fixtures_kafka.py).
set -euo pipefail
cd "$(dirname "$0")/../.."

POM=tests/kafka/pom.xml
DEST=${RT_KAFKA_JARS:-tests/kafka/target/jars}
STAMP=$DEST/.pom.sha256

die() { printf 'kafka.sh: %s\n' "$*" >&2; exit 1; }

command -v java >/dev/null 2>&1 \
  || die "java not found: the Kafka test broker needs Java 17+ (Debian: apt-get install openjdk-17-jre-headless)"
command -v mvn >/dev/null 2>&1 \
  || die "mvn not found: Maven fetches the Kafka broker jars (Debian: apt-get install maven)"

java_major=$(java -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')
case "$java_major" in
  1.*|[0-9]|1[0-6]) die "java $java_major found: the Kafka test broker needs Java 17+" ;;
esac

want=$(sha256sum "$POM" | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && ls "$DEST"/kafka_2.13-*.jar >/dev/null 2>&1; then
  exit 0
fi

printf 'kafka.sh: fetching Kafka broker jars into %s\n' "$DEST" >&2
tmp=$DEST.tmp.$$
rm -rf "$tmp"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
if ! mvn -q -B -Dstyle.color=never -f "$POM" dependency:copy-dependencies \
    -DoutputDirectory="$(cd "$tmp" && pwd)" >"$tmp.log" 2>&1; then
  cat "$tmp.log" >&2
  rm -f "$tmp.log"
  die "mvn dependency:copy-dependencies failed for $POM (network access to Maven Central?)"
fi
rm -f "$tmp.log"
ls "$tmp"/kafka_2.13-*.jar >/dev/null 2>&1 || die "no kafka_2.13 jar after copy-dependencies"
echo "$want" > "$tmp/.pom.sha256"
rm -rf "$DEST"
mv "$tmp" "$DEST"
trap - EXIT
