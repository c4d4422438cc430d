#!/usr/bin/env bash
# Start a private Docker daemon for building and testing the images on a machine that has none
# running (CI, sandboxes). No bridge, no iptables, no IP forwarding or masquerading; its socket,
# data-root, exec-root (with the containerd it starts), pid file, config and key live under
# $DFK8S_DOCKER_DIR (default /tmp/dfk8s-docker). Outside it only empty runtime folders appear
# (/run/containerd/s for shim sockets, /run/docker/plugins); a containerd already running at
# /run/containerd/containerd.sock would be used instead of a new one. Containers and builds must use
# `--network host`.
#
# Usage: hack/docker-up.sh   then   export DOCKER_HOST=unix:///tmp/dfk8s-docker/docker.sock
# Idempotent: does nothing when the daemon already answers. Stop it with hack/docker-down.sh.
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"

export DOCKER_HOST="unix://$DFK8S_DOCKER_SOCK"
timeout_s=${DFK8S_DOCKER_TIMEOUT:-60}

if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  say "private dockerd already answers on $DOCKER_HOST"
  exit 0
fi
[ "$(id -u)" -eq 0 ] || die "starting dockerd needs root (or start your own daemon and set DOCKER_HOST)"
# docker.io brings dockerd, containerd, runc and a docker CLI.
ensure_commands dockerd:docker.io docker:docker.io

mkdir -p "$DFK8S_DOCKER_DIR"
chmod 700 "$DFK8S_DOCKER_DIR"
log_file=$DFK8S_DOCKER_DIR/dockerd.log
pid_file=$DFK8S_DOCKER_DIR/dockerd.pid
# A stale socket or pid file from a daemon that died would make dockerd refuse to start.
rm -f "$DFK8S_DOCKER_SOCK" "$pid_file"
# Our own daemon.json: a system /etc/docker/daemon.json must not add to the flags below. dockerd
# before 23.0 also writes an identity key to /etc/docker/key.json unless this file names another path.
major=$(dockerd --version | sed -n 's/^Docker version \([0-9]*\)\..*/\1/p')
if [ -n "$major" ] && [ "$major" -lt 23 ]; then
  printf '{"deprecated-key-path": "%s"}\n' "$DFK8S_DOCKER_DIR/key.json" >"$DFK8S_DOCKER_DIR/daemon.json"
else
  echo '{}' >"$DFK8S_DOCKER_DIR/daemon.json"
fi
say "starting dockerd on $DOCKER_HOST (log: $log_file)"
# setsid: the daemon outlives this script and is not hit by a Ctrl-C meant for `make`.
setsid dockerd \
  --bridge=none --iptables=false --ip-forward=false --ip-masq=false \
  --data-root "$DFK8S_DOCKER_DIR/data" \
  --exec-root "$DFK8S_DOCKER_DIR/exec" \
  --pidfile "$pid_file" \
  --config-file "$DFK8S_DOCKER_DIR/daemon.json" \
  -H "unix://$DFK8S_DOCKER_SOCK" \
  >"$log_file" 2>&1 </dev/null &
daemon_pid=$!

for _ in $(seq "$((timeout_s * 2))"); do
  if docker info >/dev/null 2>&1; then
    say "dockerd is up (pid $daemon_pid, storage driver $(docker info --format '{{.Driver}}'))"
    exit 0
  fi
  if ! kill -0 "$daemon_pid" 2>/dev/null; then
    tail -n 30 "$log_file" >&2 || true
    die "dockerd exited during start; its log is above ($log_file)"
  fi
  sleep 0.5
done
tail -n 30 "$log_file" >&2 || true
die "dockerd did not answer on $DOCKER_HOST within ${timeout_s}s; its log is above ($log_file)"
