"""The test cluster's own network and mount namespaces: the node changes nothing on the host.

The process that runs the cluster (the test session, or ``make cluster-up``'s background process) calls
:func:`enter` first. From then on it, and everything it starts (etcd, the control plane, containerd,
the kubelet and its pods, SeaweedFS, the fake API), lives in:

* a network namespace made for the run: loopback, and an interface (one end of a veth pair that stays
  inside: this kernel has no dummy interfaces) holding the node's IP and the ``kubernetes`` Service's
  ClusterIP, so pods reach the API server and the test servers with no kube-proxy and no iptables
  rule; ``ip_forward`` is switched on in there only;
* a mount namespace whose mounts do not propagate to the host: the kubelet's volume mounts, the bind
  mounts below, containerd's snapshots. They go when the namespace's last process exits. ``/var/lib``
  is an overlay there whose upper layer is in the state folder: the kubelet's device-plugin socket
  folder, ``/var/lib/kubelet/device-plugins``, is fixed (no flag moves it), and it lands there.

The kubelet checks the kernel settings it would otherwise rewrite (``protectKernelDefaults``); the
values it expects are bind-mounted over those ``/proc/sys`` entries in the private mount namespace, so
the host's own settings are neither read as wrong nor written.

Only Linux, as root. Nothing here touches the host: no bridge, no iptables, no host sysctl.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

#: The node's IP (the kubelet refuses a loopback one): the API server, SeaweedFS and the fake API
#: listen on it, and pods reach them there.
NODE_IP = "10.250.0.1"
#: The ``kubernetes`` Service's ClusterIP (the first of SERVICE_CIDR): held by the dummy interface too,
#: with the API server listening on :443 of it, as pods' in-cluster config expects.
SERVICE_IP = "10.96.0.1"
SERVICE_CIDR = "10.96.0.0/16"
#: Pod addresses (the CNI's host-local IPAM); pods reach the node through their ptp veth.
POD_CIDR = "10.251.0.0/16"

_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_MS_REC, _MS_PRIVATE, _MS_BIND = 0x4000, 1 << 18, 4096

#: What the kubelet expects of the kernel (protectKernelDefaults), shown in the private mount namespace.
KERNEL_DEFAULTS = {
    "vm/overcommit_memory": "1",
    "vm/panic_on_oom": "0",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
    "kernel/keys/root_maxkeys": "1000000",
    "kernel/keys/root_maxbytes": "25000000",
}

_entered: Path | None = None
_MNT_DETACH = 2


def _libc():
    return ctypes.CDLL("libc.so.6", use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def entered() -> bool:
    """Whether this process runs in the cluster's namespaces already."""
    return _entered is not None


def enter(state_dir: Path) -> None:
    """Move this process into new network and mount namespaces set up for the cluster (once).

    Args:
        state_dir: A folder of the run: the kernel values shown to the kubelet are written there.

    Raises:
        OSError: Not root, or the kernel refuses the namespaces.
    """
    global _entered
    if _entered is not None:
        return
    libc = _libc()
    _check(libc.unshare(_CLONE_NEWNS | _CLONE_NEWNET), "unshare(mount, network)")
    # No mount of ours reaches the host, and none of the host's later ones reaches us.
    _check(libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "make / private")
    _ip("link", "set", "lo", "up")
    _ip("link", "add", "dfk8s0", "type", "veth", "peer", "name", "dfk8s1")
    _ip("addr", "add", f"{NODE_IP}/32", "dev", "dfk8s0")
    _ip("addr", "add", f"{SERVICE_IP}/32", "dev", "dfk8s0")
    _ip("link", "set", "dfk8s1", "up")
    _ip("link", "set", "dfk8s0", "up")
    # A default route makes the node IP the source of outbound traffic (the kubelet picks its
    # addresses from the routes); nothing leaves this namespace: there is no link out.
    _ip("route", "add", "default", "dev", "dfk8s0")
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1")  # this namespace's, not the host's
    layers = state_dir / "var-lib"
    for name in ("upper", "work"):
        (layers / name).mkdir(parents=True, exist_ok=True)
    options = f"lowerdir=/var/lib,upperdir={layers / 'upper'},workdir={layers / 'work'}"
    _check(libc.mount(b"overlay", b"/var/lib", b"overlay", 0, options.encode()), "overlay /var/lib")
    values = state_dir / "kernel-defaults"
    values.mkdir(parents=True, exist_ok=True)
    for key, value in KERNEL_DEFAULTS.items():
        shown = values / key.replace("/", ".")
        shown.write_text(value + "\n")
        target = f"/proc/sys/{key}"
        _check(libc.mount(str(shown).encode(), target.encode(), None, _MS_BIND, None), f"bind {target}")
    _entered = state_dir


def unmount_below(folder: Path) -> None:
    """Lazily unmount every mount at or below ``folder`` in this namespace, deepest first.

    The kubelet makes its root folder a mount of its own (for mount propagation) and mounts pods' volumes
    below it; containerd mounts snapshots. Left mounted, they keep their folders from being removed,
    and the empty folders outlive the session on the host's disk.
    """
    root = os.path.realpath(folder)
    points = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            point = line.split()[4].replace("\\040", " ")
            if point == root or point.startswith(root + "/"):
                points.append(point)
    libc = _libc()
    for point in sorted(points, key=len, reverse=True):
        libc.umount2(point.encode(), _MNT_DETACH)


def unmount() -> None:
    """Undo :func:`enter`'s mounts (the process stays in the namespaces), so its state folder can go."""
    global _entered
    if _entered is None:
        return
    libc = _libc()
    for key in KERNEL_DEFAULTS:
        libc.umount2(f"/proc/sys/{key}".encode(), _MNT_DETACH)
    libc.umount2(b"/var/lib", _MNT_DETACH)
    _entered = None
