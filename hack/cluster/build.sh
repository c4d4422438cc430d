#!/usr/bin/env bash
# Builds the local control plane's binaries from their Go modules into a cache keyed by version:
#   $DFK8S_CLUSTER_CACHE/kube-<version>/{kube-apiserver,kube-controller-manager,kube-scheduler,kubectl}
#   $DFK8S_CLUSTER_CACHE/etcd-<version>/etcd
#   $DFK8S_CLUSTER_CACHE/helm-<version>/helm
# A folder that already holds its binaries is kept, so a second run takes a second.
# Usage: build.sh [kube versions...]   (default: every hack/cluster/kube-*/VERSION)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${DFK8S_CLUSTER_CACHE:-$HOME/.cache/dfk8s/cluster}
mkdir -p "$cache"

module_version() {  # module_version DIR MODULE: the version DIR's go.mod requires
  (cd "$1" && go list -m -f '{{.Version}}' "$2")
}

build() {  # build DIR DEST PKG... : go build PKGs of module DIR into DEST, atomically
  local dir=$1 dest=$2; shift 2
  if [ -f "$dest/.complete" ]; then return 0; fi
  local tmp="$dest.tmp.$$"
  rm -rf "$tmp"; mkdir -p "$tmp"
  local start=$SECONDS
  echo "building $(basename "$dest") (first time only; minutes)..." >&2
  (cd "$dir" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w ${LDFLAGS:-}" -o "$tmp/" "$@")
  touch "$tmp/.complete"
  rm -rf "$dest"; mv "$tmp" "$dest"
  echo "built $(basename "$dest") in $((SECONDS - start)) s" >&2
}

kube_versions=("$@")
if [ ${#kube_versions[@]} -eq 0 ]; then
  for f in "$here"/kube-*/VERSION; do kube_versions+=("$(cat "$f")"); done
fi
for v in "${kube_versions[@]}"; do
  minor=$(echo "$v" | cut -d. -f1-2 | tr -d v)
  dir="$here/kube-$minor"
  [ "$(cat "$dir/VERSION")" = "$v" ] || { echo "no pinned module for $v in $dir" >&2; exit 2; }
  major_n=$(echo "$v" | cut -d. -f1 | tr -d v); minor_n=$(echo "$v" | cut -d. -f2)
  # /version must report the real release, as a released binary does.
  LDFLAGS=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    LDFLAGS+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=$major_n -X $pkg.gitMinor=$minor_n"
    LDFLAGS+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  LDFLAGS=$LDFLAGS build "$dir" "$cache/kube-$v" k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubectl
done
etcd_v=$(module_version "$here/etcd" go.etcd.io/etcd/server/v3)
build "$here/etcd" "$cache/etcd-$etcd_v" .
helm_v=$(module_version "$here/helm" helm.sh/helm/v3)
LDFLAGS="-X helm.sh/helm/v3/internal/version.version=$helm_v" \
  build "$here/helm" "$cache/helm-$helm_v" helm.sh/helm/v3/cmd/helm
echo "$cache"
