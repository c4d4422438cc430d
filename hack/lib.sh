# shellcheck shell=bash
# Shared settings of the hack/ scripts: where the private Docker daemon lives and how to reach it.
# Sourced, never run. Every path can be overridden from the environment.

# The private daemon's folder: socket, data-root, exec-root, pid file and log all live under it, so it
# never touches a system Docker (/var/lib/docker, /var/run/docker.sock) that may also be running.
DFK8S_DOCKER_DIR=${DFK8S_DOCKER_DIR:-/tmp/dfk8s-docker}
DFK8S_DOCKER_SOCK=${DFK8S_DOCKER_SOCK:-$DFK8S_DOCKER_DIR/docker.sock}
# Image names the scripts build; the tests and the Makefile read the same variables.
DFK8S_BASE_IMAGE=${DFK8S_BASE_IMAGE:-dfk8s-base:bookworm}
DFK8S_CPU_IMAGE=${DFK8S_CPU_IMAGE:-dfk8s-cpu:dev}
DFK8S_GPU_IMAGE=${DFK8S_GPU_IMAGE:-dfk8s-gpu:dev}

# Print a message on stderr and stop.
die() {
  echo "error: $*" >&2
  exit 1
}

# Print a progress line on stderr.
say() {
  echo "--> $*" >&2
}

# The repository root (the parent of hack/).
repo_root() {
  cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd
}

# Install Debian packages with apt-get when one of the commands they provide is missing.
# Usage: ensure_commands "dockerd:docker.io" "debootstrap:debootstrap"
ensure_commands() {
  local pair command package missing=()
  for pair in "$@"; do
    command=${pair%%:*}
    package=${pair#*:}
    command -v "$command" >/dev/null 2>&1 || missing+=("$package")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    die "missing ${missing[*]}: install them (Debian/Ubuntu: apt-get install -y ${missing[*]}) and retry"
  fi
  say "installing ${missing[*]} with apt-get"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

# Lazily unmount everything mounted below folder $1, deepest first, so that deleting the folder never
# reaches into a /proc, /sys or overlay mounted there (debootstrap, a killed dockerd).
unmount_under() {
  local mount_point
  command -v findmnt >/dev/null 2>&1 || return 0
  findmnt -rn -o TARGET | { grep "^$1/" || true; } | sort -r | while read -r mount_point; do
    umount -l "$mount_point" 2>/dev/null || true
  done
}
