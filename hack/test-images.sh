#!/usr/bin/env bash
# `make test-images`: start the private Docker daemon (hack/docker-up.sh), build the debootstrap base
# and the CPU image on it, run tests/images with DFK8S_IMAGE_TESTS=1 (no skips: a missing daemon or
# image fails), and stop the daemon again, failed or not. Its data-root under $DFK8S_DOCKER_DIR stays
# as the build cache of the next run (hack/docker-down.sh --purge empties it).
#
# Needs root on a machine without Docker (CI): it installs docker.io, debootstrap and shellcheck with
# apt when they are missing. PYTHON names the interpreter with dfk8s[test] (default .venv/bin/python).
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"

root=$(repo_root)
python=${PYTHON:-$root/.venv/bin/python}
[ -x "$python" ] || die "$python is missing: run \`make install\` first"
started=$SECONDS

# On a fresh machine: docker.io, debootstrap and shellcheck in one apt run.
if [ "$(id -u)" -eq 0 ]; then
  ensure_commands dockerd:docker.io docker:docker.io debootstrap:debootstrap shellcheck:shellcheck
fi
export DOCKER_HOST="unix://$DFK8S_DOCKER_SOCK"
"$root/hack/docker-up.sh"
stop_daemon() {
  local status=$?
  "$root/hack/docker-down.sh" || true
  exit "$status"
}
trap stop_daemon EXIT

"$root/hack/base-image.sh"
BASE_IMAGE=$DFK8S_BASE_IMAGE "$root/hack/build-image.sh" cpu
say "images ready after $((SECONDS - started)) s; running tests/images"
cd "$root"
DFK8S_IMAGE_TESTS=1 "$python" -m pytest -q -p no:xdist -p no:cacheprovider -rs --durations=5 tests/images
say "make test-images passed in $((SECONDS - started)) s"
