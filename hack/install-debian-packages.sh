#!/usr/bin/env bash
# The Debian packages the suite uses: chromium for the report's browser tests (Playwright drives
# /usr/bin/chromium; it never downloads a browser of its own) and shellcheck for the hack/ scripts'
# lint test. Installs only what is missing; does nothing when both are there.
set -euo pipefail
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO="sudo"
fi
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
