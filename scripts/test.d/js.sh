#!/usr/bin/env bash
# Installs what the JavaScript client tests and the browser test need: Node.js and npm,
# Debian's Chromium (/usr/bin/chromium, driven by playwright-core), and the npm packages of
# clients/js (ws, playwright-core) from its package-lock.json. Quick when all is in place.
set -euo pipefail
cd "$(dirname "$0")/../.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ "${#missing[@]}" -gt 0 ]; then
  printf 'js.sh: installing %s from Debian packages\n' "${missing[*]}" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi

cd clients/js
# npm ci only when the lockfile changed since the last install (it wipes node_modules).
stamp=node_modules/.package-lock.sha256
want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  printf 'js.sh: npm ci in clients/js\n' >&2
  npm ci --no-audit --no-fund --loglevel=error
  echo "$want" > "$stamp"
fi
