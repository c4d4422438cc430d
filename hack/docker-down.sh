#!/usr/bin/env bash
# Stop the private Docker daemon that hack/docker-up.sh started (by the pid in its pid file only).
# Its data-root stays as a build cache for the next start; `--purge` deletes it too.
#
# Usage: hack/docker-down.sh [--purge]
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"

purge=false
case "${1:-}" in
  "") ;;
  --purge) purge=true ;;
  *) die "usage: $0 [--purge]" ;;
esac

pid_file=$DFK8S_DOCKER_DIR/dockerd.pid
if [ -s "$pid_file" ]; then
  pid=$(cat "$pid_file")
  if kill -0 "$pid" 2>/dev/null; then
    say "stopping dockerd (pid $pid)"
    # dockerd stops its containers and its managed containerd on SIGTERM; give it 30 s.
    kill -TERM "$pid"
    for _ in $(seq 60); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
      say "dockerd did not stop in 30 s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$pid_file"
else
  say "no private dockerd running (no $pid_file)"
fi
rm -f "$DFK8S_DOCKER_SOCK"

if $purge; then
  # Overlay mounts of a killed daemon may linger; unmount them before deleting the folder.
  unmount_under "$DFK8S_DOCKER_DIR"
  say "deleting $DFK8S_DOCKER_DIR"
  rm -rf --one-file-system "$DFK8S_DOCKER_DIR"
fi
