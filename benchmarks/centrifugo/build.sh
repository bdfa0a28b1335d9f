#!/usr/bin/env bash
# Build Centrifugo v6 (the comparison server of the fan-out benchmarks) into
# benchmarks/centrifugo/bin/centrifugo. Run by hand when wanted; never in CI (it downloads
# and compiles a few hundred Go modules, several minutes on two cores).
#   bash benchmarks/centrifugo/build.sh            # latest v6
#   CENTRIFUGO_VERSION=v6.1.0 bash benchmarks/centrifugo/build.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
version="${CENTRIFUGO_VERSION:-latest}"
if [[ "${CI:-}" == "true" ]]; then
  echo "build.sh: not building Centrifugo in CI" >&2
  exit 0
fi
command -v go >/dev/null || { echo "build.sh: Go toolchain not found (need go >= 1.23)" >&2; exit 1; }
mkdir -p "$here/bin"
# nice: other work shares the machine; the build is not urgent.
GOBIN="$here/bin" CGO_ENABLED=0 nice -n 19 go install "github.com/centrifugal/centrifugo/v6@${version}"
"$here/bin/centrifugo" version
