#!/usr/bin/env bash
# Debian's chromium for the report's browser tests (Playwright drives /usr/bin/chromium; it never downloads
# a browser of its own). Does nothing when it is already there.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO="sudo"
fi
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium
