#!/usr/bin/env bash
# The images the test cluster's node runs, built from this checkout and saved as archives that the
# node's containerd imports (no registry can be reached here):
#   $DFK8S_CLUSTER_CACHE/images/dfk8s-cpu.tar   dfk8s-cpu:dev (make image-cpu): launcher, reducer, API workers
#   $DFK8S_CLUSTER_CACHE/images/dfk8s-gpu.tar   dfk8s-gpu:dev (make image-gpu): the FLUX workers
# Both are built FROM the debootstrap base (hack/base-image.sh) on the private Docker daemon
# (hack/docker-up.sh), which this script starts when none answers and stops again. Docker's layer cache
# makes an unchanged checkout take seconds; an archive is written again only when its image changed.
#
# Cold: about 3 min for the CPU image and 6 min for the GPU one (torch and its CUDA libraries from PyPI:
# the GPU image is ~6 GB). Warm: seconds.
# Usage: hack/cluster/images.sh [cpu] [gpu]   (default: both)
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/../lib.sh"

root=$(repo_root)
cache=${DFK8S_CLUSTER_CACHE:-$HOME/.cache/dfk8s/cluster}
kinds=("$@")
[ ${#kinds[@]} -gt 0 ] || kinds=(cpu gpu)
mkdir -p "$cache/images"
started=$SECONDS

if [ "$(id -u)" -eq 0 ]; then
  ensure_commands dockerd:docker.io docker:docker.io debootstrap:debootstrap
fi
export DOCKER_HOST="unix://$DFK8S_DOCKER_SOCK"
own_daemon=false
if ! docker info >/dev/null 2>&1; then
  "$root/hack/docker-up.sh"
  own_daemon=true
fi
stop_daemon() {
  local status=$?
  if $own_daemon; then "$root/hack/docker-down.sh" || true; fi
  exit "$status"
}
trap stop_daemon EXIT

"$root/hack/base-image.sh"
for kind in "${kinds[@]}"; do
  case "$kind" in
    cpu) tag=$DFK8S_CPU_IMAGE ;;
    gpu) tag=$DFK8S_GPU_IMAGE ;;
    *) die "usage: $0 [cpu] [gpu]" ;;
  esac
  BASE_IMAGE=$DFK8S_BASE_IMAGE "$root/hack/build-image.sh" "$kind"
  archive=$cache/images/dfk8s-$kind.tar
  id=$(docker image inspect --format '{{.Id}}' "$tag")
  if [ -f "$archive" ] && [ "$(cat "$archive.id" 2>/dev/null)" = "$id" ]; then
    say "$archive is $tag already"
    continue
  fi
  say "saving $tag to $archive"
  # The stale archive goes first: never two GPU images (~6 GB each) on disk at once.
  rm -f "$archive" "$archive.id" "$archive.tmp"
  docker save "$tag" -o "$archive.tmp"
  mv "$archive.tmp" "$archive"
  echo "$id" >"$archive.id"
done
say "cluster images ready in $((SECONDS - started)) s"
