#!/usr/bin/env bash
# Make the Debian bookworm base image the Dockerfiles build FROM when no registry can be reached:
# `debootstrap --variant=minbase bookworm` piped into `docker import` as $DFK8S_BASE_IMAGE
# (default dfk8s-base:bookworm). Skips the work when the image already exists; --force rebuilds it.
#
# The mirror is the one apt uses on this machine (so a proxy or local mirror keeps working); set
# DEBIAN_MIRROR / DEBIAN_SECURITY_MIRROR to choose others. Needs root (debootstrap) and a Docker
# daemon (DOCKER_HOST, e.g. the private one of hack/docker-up.sh).
#
# Usage: hack/base-image.sh [--force]
set -euo pipefail
# shellcheck source=hack/lib.sh
source "$(dirname "$0")/lib.sh"

suite=bookworm
force=false
case "${1:-}" in
  "") ;;
  --force) force=true ;;
  *) die "usage: $0 [--force]" ;;
esac

docker info >/dev/null 2>&1 || die "no Docker daemon answers${DOCKER_HOST:+ on $DOCKER_HOST}; run hack/docker-up.sh first"
if ! $force && docker image inspect "$DFK8S_BASE_IMAGE" >/dev/null 2>&1; then
  say "$DFK8S_BASE_IMAGE exists (hack/base-image.sh --force rebuilds it)"
  exit 0
fi
[ "$(id -u)" -eq 0 ] || die "debootstrap needs root"
ensure_commands debootstrap:debootstrap

# Print the first URI apt uses for suite $1, from one-line (.list) and deb822 (.sources) files
# (the files given after the suite, default: this machine's apt sources).
apt_uri_for_suite() {
  local wanted=$1 file files=()
  shift
  [ $# -gt 0 ] || set -- /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources
  for file in "$@"; do
    if [ -f "$file" ]; then files+=("$file"); fi
  done
  [ ${#files[@]} -gt 0 ] || return 0
  awk -v wanted="$wanted" '
    function flush() {
      if (!found && types ~ /(^| )deb( |$)/ && enabled != "no") {
        n = split(suites, list, " ")
        for (i = 1; i <= n; i++) if (list[i] == wanted) { split(uris, u, " "); print u[1]; found = 1; exit }
      }
      types = ""; uris = ""; suites = ""; enabled = ""
    }
    FNR == 1 { flush() }
    /^[[:space:]]*#/ { next }
    # One-line format: deb [options] URI SUITE COMPONENTS...
    $1 == "deb" {
      i = 2
      if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
      if ($(i + 1) == wanted) { print $i; found = 1; exit }
      next
    }
    # deb822 format: stanzas of Key: value lines, separated by blank lines.
    /^[[:space:]]*$/ { flush(); next }
    tolower($1) == "types:" { $1 = ""; types = $0; sub(/^ +/, "", types) }
    tolower($1) == "uris:" { $1 = ""; uris = $0; sub(/^ +/, "", uris) }
    tolower($1) == "suites:" { $1 = ""; suites = $0; sub(/^ +/, "", suites) }
    tolower($1) == "enabled:" { enabled = tolower($2) }
    END { flush() }
  ' "${files[@]}"
}

mirror=${DEBIAN_MIRROR:-$(apt_uri_for_suite "$suite")}
mirror=${mirror:-http://deb.debian.org/debian}
security_mirror=${DEBIAN_SECURITY_MIRROR:-$(apt_uri_for_suite "$suite-security")}
security_mirror=${security_mirror:-http://deb.debian.org/debian-security}

rootfs=$(mktemp -d /tmp/dfk8s-rootfs.XXXXXX)
cleanup() {
  # debootstrap mounts /proc and /sys inside the target while it works; never delete through them.
  unmount_under "$rootfs"
  rm -rf --one-file-system "$rootfs"
}
trap cleanup EXIT

say "debootstrap --variant=minbase $suite from $mirror"
started=$SECONDS
if ! debootstrap --variant=minbase "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1; then
  tail -n 30 "$rootfs.log" >&2
  die "debootstrap failed (log above, full log: $rootfs.log)"
fi
rm -f "$rootfs.log"

# What the official debian:*-slim images do: apt sources with updates and security fixes, no docs,
# man pages or translations from later installs, no package caches in the layer.
cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $mirror $suite main
deb $mirror $suite-updates main
deb $security_mirror $suite-security main
SOURCES
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
DPKG
cat >"$rootfs/etc/apt/apt.conf.d/docker-slim" <<'APT'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
APT
find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/cache/apt/*.bin \
  "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log
find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +

say "docker import as $DFK8S_BASE_IMAGE"
tar -C "$rootfs" --numeric-owner -cf - . |
  docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' \
    --message "debootstrap --variant=minbase $suite $mirror" \
    - "$DFK8S_BASE_IMAGE" >/dev/null
say "$DFK8S_BASE_IMAGE: $(docker image inspect --format '{{.Size}}' "$DFK8S_BASE_IMAGE" | awk '{printf "%.0f MB", $1 / 1e6}') in $((SECONDS - started)) s"
