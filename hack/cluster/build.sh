#!/usr/bin/env bash
# Builds the local cluster's binaries from their Go modules into a cache keyed by version:
#   $DFK8S_CLUSTER_CACHE/kube-<version>/{kube-apiserver,kube-controller-manager,kube-scheduler,kubectl,kubelet}
#   $DFK8S_CLUSTER_CACHE/etcd-<version>/etcd
#   $DFK8S_CLUSTER_CACHE/helm-<version>/helm
#   $DFK8S_CLUSTER_CACHE/cni-<version>/{ptp,host-local,loopback}   the CNI plugins the node uses
#   $DFK8S_CLUSTER_CACHE/fake-gpu-<hash>/fake-gpu                  the fake GPU device plugin
# and installs the node's container runtime from Debian (containerd 1.6, runc 1.1) when missing.
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
  local pkg have=1
  for pkg in "$@"; do [ -x "$dest/$(basename "$pkg")" ] || have=0; done
  if [ -f "$dest/.complete" ] && [ $have = 1 ]; then return 0; fi
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
    k8s.io/kubernetes/cmd/kubectl k8s.io/kubernetes/cmd/kubelet
done
etcd_v=$(module_version "$here/etcd" go.etcd.io/etcd/server/v3)
build "$here/etcd" "$cache/etcd-$etcd_v" .
helm_v=$(module_version "$here/helm" helm.sh/helm/v3)
LDFLAGS="-X helm.sh/helm/v3/internal/version.version=$helm_v" \
  build "$here/helm" "$cache/helm-$helm_v" helm.sh/helm/v3/cmd/helm
cni_v=$(module_version "$here/cni" github.com/containernetworking/plugins)
build "$here/cni" "$cache/cni-$cni_v" github.com/containernetworking/plugins/plugins/main/ptp \
  github.com/containernetworking/plugins/plugins/ipam/host-local \
  github.com/containernetworking/plugins/plugins/main/loopback
gpu_hash=$(cat "$here/fake-gpu/go.mod" "$here/fake-gpu/main.go" | sha256sum | cut -c1-12)
build "$here/fake-gpu" "$cache/fake-gpu-$gpu_hash" .
# The node's container runtime, Debian's containerd and runc (the node starts its own containerd), and
# static busybox, the node's pause image (tests/cluster/node.py builds it: no registry here).
if ! command -v containerd >/dev/null || ! command -v runc >/dev/null || [ ! -x /bin/busybox ]; then
  echo "installing containerd, runc and busybox-static (Debian)..." >&2
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends containerd runc busybox-static >/dev/null
fi
echo "$cache"
