#!/usr/bin/env bash
# Build a dfk8s image from the repository, sending the Docker daemon only what the image needs
# (pyproject.toml, README.md, dfk8s/, jobs/, the Dockerfile): never .venv, runs/ or caches.
#
# Usage: hack/build-image.sh cpu|gpu [docker build flags...]
#   BASE_IMAGE=dfk8s-base:bookworm hack/build-image.sh cpu   # build FROM another base
#   DFK8S_CPU_IMAGE / DFK8S_GPU_IMAGE name the result (default dfk8s-cpu:dev / dfk8s-gpu:dev).
#   DFK8S_BUILD_NETWORK: network of the build's RUN steps (default host; empty: the daemon's).
#   DFK8S_BUILD_CA: a CA bundle pip must trust inside the build (a TLS-intercepting proxy); default
#     the one this machine's pip uses ($PIP_CERT or pip's global.cert). It stays in the build stage.
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"

kind=${1:-}
case "$kind" in
  cpu) tag=$DFK8S_CPU_IMAGE ;;
  gpu) tag=$DFK8S_GPU_IMAGE ;;
  *) die "usage: $0 cpu|gpu [docker build flags...]" ;;
esac
shift

root=$(repo_root)
docker info >/dev/null 2>&1 || die "no Docker daemon answers${DOCKER_HOST:+ on $DOCKER_HOST}; start one (hack/docker-up.sh)"

build_args=(--file "images/$kind/Dockerfile")
network=${DFK8S_BUILD_NETWORK-host}
[ -n "$network" ] && build_args+=(--network "$network")
[ -n "${BASE_IMAGE:-}" ] && build_args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")

extra=$(mktemp -d /tmp/dfk8s-build.XXXXXX)
trap 'rm -rf "$extra"' EXIT
ca=${DFK8S_BUILD_CA:-${PIP_CERT:-}}
if [ -z "$ca" ] && command -v python3 >/dev/null 2>&1; then
  ca=$(python3 -m pip config get global.cert 2>/dev/null || true)
fi
extra_files=()
if [ -n "$ca" ]; then
  [ -r "$ca" ] || die "CA bundle $ca (DFK8S_BUILD_CA / PIP_CERT) cannot be read"
  mkdir -p "$extra/images/build-ca"
  cp -L "$ca" "$extra/images/build-ca/ca.pem"
  extra_files=(-C "$extra" images/build-ca/ca.pem)
  say "pip inside the build trusts $ca"
fi

say "building $tag from images/$kind/Dockerfile${BASE_IMAGE:+ on $BASE_IMAGE}"
started=$SECONDS
context() {
  tar -C "$root" -cf - \
    --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' \
    pyproject.toml README.md dfk8s jobs "images/$kind/Dockerfile" images/build-ca ${extra_files[@]+"${extra_files[@]}"}
}
# The deps stage first, under a name of its own (dfk8s-<kind>-deps:dev): the prune below then keeps
# its layers, and with them the cache that spares the next build a reinstall of the dependencies.
case "${tag##*/}" in
  *:*) deps_tag="${tag%:*}-deps:${tag##*:}" ;;
  *) deps_tag="$tag-deps" ;;
esac
context | docker build "${build_args[@]}" --target deps --tag "$deps_tag" "$@" -
context | docker build "${build_args[@]}" --tag "$tag" "$@" -
# Every rebuild leaves the image it replaced untagged (the GPU one is ~6 GB); remove those, or a few
# source edits fill the disk.
docker image prune --force >/dev/null
size=$(docker image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1 / 1e6}')
say "$tag: $size, built in $((SECONDS - started)) s"
