"""A real node for the test cluster: containerd (Debian's, with runc) and the kubelet built from its module.

It runs in the cluster's namespaces (:mod:`tests.cluster.sandbox`) and keeps every file in its state
folder: containerd's root, state and socket, the CNI configuration and IP allocations, the kubelet's
root, pod logs and certificates. Its cgroups live under one root of their own in each controller
(``/dfk8s-node-<id>``), removed when it stops. The settings this host needs:

* cgroup v1 without systemd: ``failCgroupV1: false``, ``cgroupDriver: cgroupfs`` (runc without systemd);
* root lacks CAP_SYS_RESOURCE: containerd's ``restrict_oom_score_adj = true``;
* the kubelet refuses a loopback node IP: the sandbox's own interface holds
  :data:`~tests.cluster.sandbox.NODE_IP`;
* the kubelet's device-plugin folder is fixed (/var/lib/kubelet/device-plugins): the sandbox lays an
  overlay over /var/lib, whose writes land in the state folder, never on the host;
* ``protectKernelDefaults: true``: the kubelet checks, never writes, the kernel settings (the sandbox
  shows it the values it expects);
* the node's credential: a certificate for ``system:node:<name>`` signed by the cluster CA; for
  ``kubectl logs`` and ``exec`` the API server's kubelet client is bound to ``system:kubelet-api-admin``;
* the pause image: any local image whose command sleeps forever (busybox's, built here as an OCI
  archive, no registry).

Images are imported with ``ctr images import`` (``imagePullPolicy: IfNotPresent`` finds them). GPUs:
hack/cluster/fake-gpu registers :data:`GPUS` fake ``nvidia.com/gpu`` devices through the kubelet's real
device-plugin API: the one stand-in.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
import uuid
from pathlib import Path

from tests.cluster.sandbox import NODE_IP, POD_CIDR
from tests.helpers.processes import wait_while_running

#: The node's name; its labels say it has GPUs (the fake device plugin's), as NVIDIA's discovery would.
NODE_NAME = "dfk8s-node"
NODE_LABELS = {"nvidia.com/gpu.present": "true"}
#: Fake GPUs the device plugin registers.
GPUS = 4
PAUSE_IMAGE = "dfk8s-pause:dev"
#: containerd's sockets, in the node's folder (short names: a unix socket's path has at most 107 bytes).
SOCKET, TTRPC_SOCKET = "cd.sock", "cd-ttrpc.sock"
#: Fixed in the kubelet (no flag moves it); the sandbox's /var/lib overlay keeps it in the state folder.
DEVICE_PLUGINS = Path("/var/lib/kubelet/device-plugins")
KUBELET_PORT = 10250
#: Disk left free beyond an image import's own need: the S3 server, logs and the pods' writes.
DISK_MARGIN = 5 * 10**9
CGROUP_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "pids", "blkio", "devices", "freezer",
                      "systemd", "hugetlb", "net_cls", "net_prio", "perf_event", "rdma", "misc")


def image_archive(kind: str) -> Path:
    """The archive of ``dfk8s-<kind>:dev`` saved by hack/cluster/images.sh (``make test-cluster`` runs it)."""
    from tests.cluster.controlplane import CACHE

    path = CACHE / "images" / f"dfk8s-{kind}.tar"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: run hack/cluster/images.sh {kind} (make test-cluster does)")
    return path


def check_free_disk(folder: Path, archive: Path) -> None:
    """Refuse, in one line, to import ``archive`` where the disk cannot hold it.

    containerd keeps the archive's layers and then unpacks them into a snapshot: about twice the archive.
    Short of that, the import itself may pass and the disk fill up later, and the failures that follow
    are far from their cause (S3 answering 500, pods stuck in ContainerCreating until a test times out).
    """
    size = archive.stat().st_size
    need = 2 * size + DISK_MARGIN
    free = shutil.disk_usage(folder).free
    if free < need:
        raise RuntimeError(
            f"importing {archive.name} ({size / 1e9:.1f} GB) needs {need / 1e9:.0f} GB free on the disk "
            f"of {folder}, and {free / 1e9:.0f} GB are: free some (old images in the private dockerd: "
            "hack/docker-down.sh --purge)")


def cpu_image_tags() -> tuple[str, ...]:
    """The names the CPU image goes by on the node: the build's, and the one submit uses by default."""
    from dfk8s.kube.manifests import cpu_image

    return ("dfk8s-cpu:dev", cpu_image())


def gpu_image_tags() -> tuple[str, ...]:
    """The names the GPU image goes by on the node: the build's, and the text2image profile's."""
    from dfk8s.kube.profiles import load_profile

    return ("dfk8s-gpu:dev", load_profile("text2image", "diffusers").image)


def _full_name(image: str) -> str:
    """containerd's name for a Docker-style reference (``dfk8s-cpu:dev``: docker.io/library/dfk8s-cpu:dev)."""
    first = image.split("/")[0]
    if "/" not in image:
        return f"docker.io/library/{image}"
    if "." in first or ":" in first or first == "localhost":
        return image
    return f"docker.io/{image}"


def small_profiles(folder: Path, requests: dict[str, str]) -> Path:
    """Write the packaged job profiles into ``folder`` with each resource request capped at ``requests``.

    The real profiles ask for a real node's share (a FLUX worker: 8 CPUs, 64 GiB); this node has 2 CPUs.
    Limits, images, selectors and tolerations stay as they are.
    """
    import yaml

    source = Path(__file__).resolve().parents[2] / "jobs"  # the packaged ones (pyproject's data files)

    def cap(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "requests" and isinstance(value, dict):
                    node[key] = {**value, **{k: v for k, v in requests.items() if k in value}}
                else:
                    cap(value)
        elif isinstance(node, list):
            for item in node:
                cap(item)

    for path in sorted(source.glob("*.yaml")):
        profile = yaml.safe_load(path.read_text())
        cap(profile)
        (folder / path.name).write_text(yaml.safe_dump(profile, sort_keys=False))
    return folder


def pause_archive(path: Path) -> Path:
    """Write an OCI image archive of ``PAUSE_IMAGE``: static busybox, sleeping forever."""
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        raise RuntimeError("/bin/busybox is missing: apt-get install busybox-static (hack/cluster/build.sh)")
    layer_tar = io.BytesIO()
    with tarfile.open(fileobj=layer_tar, mode="w") as tar:
        info = tar.gettarinfo(str(busybox), arcname="bin/busybox")
        info.uid = info.gid = 0
        with busybox.open("rb") as handle:
            tar.addfile(info, handle)
    diff_id = "sha256:" + hashlib.sha256(layer_tar.getvalue()).hexdigest()
    layer = gzip.compress(layer_tar.getvalue(), mtime=0)
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Entrypoint": ["/bin/busybox", "sleep", "2147483647"], "User": "65535"},
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> dict:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"digest": digest, "size": len(data)}

    config_ref = {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(config)}
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": config_ref,
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                       **blob(layer)}]}).encode()
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", **blob(manifest),
        "annotations": {"io.containerd.image.name": f"docker.io/library/{PAUSE_IMAGE}",
                        "org.opencontainers.image.ref.name": PAUSE_IMAGE.split(":")[1]}}]}
    with tarfile.open(path, "w") as tar:
        for name, data in [("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'),
                           ("index.json", json.dumps(index).encode())] + [
                (f"blobs/sha256/{digest.split(':')[1]}", data) for digest, data in blobs.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _make_cgroups(cgroup_root: str) -> None:
    """Make the node's cgroup root in every v1 controller."""
    for controller in CGROUP_CONTROLLERS:
        base = Path("/sys/fs/cgroup") / controller
        if base.is_dir():
            root = base / cgroup_root.lstrip("/")
            root.mkdir(exist_ok=True)
            if controller == "cpuset":  # a new cpuset is empty: it takes its parent's cpus and mems
                for name in ("cpuset.cpus", "cpuset.mems"):
                    (root / name).write_text((base / name).read_text())


def _remove_cgroups(cgroup_root: str) -> None:
    """Remove the node's cgroups, deepest first, in every hierarchy (runc makes some in the unified one)."""
    for base in Path("/sys/fs/cgroup").iterdir():
        root = base / cgroup_root.lstrip("/")
        if not root.is_dir():
            continue
        for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            try:
                folder.rmdir()
            except OSError:
                pass
        try:
            root.rmdir()
        except OSError:
            pass


def _kill_containers(cgroup_root: str, socket: Path) -> None:
    """SIGKILL every process in the node's cgroups (the containers) and containerd's shims of the node."""
    pids = set()
    for controller in ("pids", "memory", "cpu"):
        base = Path("/sys/fs/cgroup") / controller / cgroup_root.lstrip("/")
        for procs in base.rglob("cgroup.procs") if base.is_dir() else ():
            try:
                pids.update(int(p) for p in procs.read_text().split())
            except OSError:
                pass
    # The shims run outside the pods' cgroups (containerd starts them): found by the socket they serve.
    shims = subprocess.run(["pgrep", "-f", f"containerd-shim-runc-v2 .*-address {socket}"],
                           capture_output=True, text=True).stdout.split()
    for pid in pids | {int(p) for p in shims}:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
        time.sleep(0.1)


def reap(state_dir: Path) -> None:
    """Stop what a node whose process was killed left behind: its containers, their shims, its cgroups."""
    marker = Path(state_dir) / "cgroup-root"
    if marker.is_file():
        cgroup_root = marker.read_text().strip()
        _kill_containers(cgroup_root, Path(state_dir) / SOCKET)
        _remove_cgroups(cgroup_root)


class Node:
    """containerd + kubelet + the fake GPU plugin, for a running :class:`ControlPlane`.

    Args:
        plane: The control plane (its CA, its API server, its binaries).
        state_dir: The node's folder (everything it writes).
    """

    def __init__(self, plane, state_dir: Path):
        self.plane = plane
        self.dir = Path(state_dir)
        self.procs: dict = {}
        self.cgroup_root = f"/dfk8s-node-{uuid.uuid4().hex[:8]}"
        self.socket = self.dir / SOCKET
        self.kubelet_root = self.dir / "kubelet"

    # ----- start ----------------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> Node:
        from tests.cluster.controlplane import start_process

        deadline = time.monotonic() + timeout
        if len(str(self.dir / TTRPC_SOCKET)) > 100:  # a unix socket's path has at most 107 bytes
            raise RuntimeError(f"{self.dir} is too deep for containerd's sockets: use a shorter state folder")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "cgroup-root").write_text(self.cgroup_root)  # for reap(), should this process be killed
        _make_cgroups(self.cgroup_root)
        config = self._containerd_config()
        self.procs["containerd"] = start_process(["containerd", "--config", str(config)],
                                                 self.dir / "containerd.log")
        self._wait(lambda: self.socket.exists() and self.ctr("version").returncode == 0, "containerd",
                   deadline)
        self.import_archive(pause_archive(self.dir / "pause.tar"))
        self.procs["kubelet"] = start_process(self._kubelet_argv(), self.dir / "kubelet.log")
        plugins = DEVICE_PLUGINS
        self._wait(lambda: (plugins / "kubelet.sock").exists(), "the kubelet's device-plugin socket",
                   deadline)
        self.procs["fake-gpu"] = start_process(
            [str(self.plane.bin["fake-gpu"]), "-dir", str(plugins), "-count", str(GPUS)],
            self.dir / "fake-gpu.log")
        self._wait(self._ready, f"node {NODE_NAME} Ready with {GPUS} nvidia.com/gpu", deadline)
        return self

    def _containerd_config(self) -> Path:
        cni_conf = self.dir / "cni" / "net.d"
        cni_conf.mkdir(parents=True, exist_ok=True)
        (cni_conf / "10-dfk8s.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "dfk8s", "plugins": [
                {"type": "ptp", "ipMasq": False, "ipam": {
                    "type": "host-local", "dataDir": str(self.dir / "cni" / "ipam"),
                    "ranges": [[{"subnet": POD_CIDR}]], "routes": [{"dst": "0.0.0.0/0"}]}},
                {"type": "loopback"}]}))
        root = self.dir / "containerd"
        path = root / "config.toml"
        root.mkdir(parents=True, exist_ok=True)
        path.write_text(f"""version = 2
root = "{root / 'root'}"
state = "{root / 'state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.internal.v1.opt", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.dir / TTRPC_SOCKET}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "docker.io/library/{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{self.plane.bin['cni'].parent}"
    conf_dir = "{cni_conf}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
""")
        return path

    def _kubelet_argv(self) -> list[str]:
        from tests.cluster.controlplane import write_kubeconfig

        certs = self.plane.certs
        cert, key = certs.issue("kubelet-client", f"system:node:{NODE_NAME}", orgs=["system:nodes"])
        kubeconfig = write_kubeconfig(self.dir / "kubelet.kubeconfig", self.plane.server, certs.ca, cert=cert,
                                      key=key)
        serving = certs.issue("kubelet-serving-cert", NODE_NAME, server=True, client=False, ips=[NODE_IP])
        self.kubelet_root.mkdir(parents=True, exist_ok=True)
        config = self.dir / "kubelet.yaml"
        config.write_text(json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(certs.ca)}},
            "authorization": {"mode": "Webhook"},
            "address": NODE_IP, "port": KUBELET_PORT, "readOnlyPort": 0, "healthzPort": 0,
            "tlsCertFile": str(serving[0]), "tlsPrivateKeyFile": str(serving[1]),
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "cgroupDriver": "cgroupfs", "cgroupRoot": self.cgroup_root, "failCgroupV1": False,
            "failSwapOn": False, "protectKernelDefaults": True,
            "podLogsDir": str(self.dir / "pod-logs"), "resolvConf": "/etc/resolv.conf",
            "serializeImagePulls": False, "registerNode": True, "maxPods": 30,
            # A test machine's disk fills up with images: no evictions and no image GC for that.
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "syncFrequency": "5s", "fileCheckFrequency": "5s", "nodeStatusUpdateFrequency": "5s",
        }))
        labels = ",".join(f"{k}={v}" for k, v in NODE_LABELS.items())
        return [str(self.plane.bin["kubelet"]), f"--config={config}", f"--kubeconfig={kubeconfig}",
                f"--root-dir={self.kubelet_root}", f"--cert-dir={self.dir / 'kubelet-pki'}",
                f"--node-ip={NODE_IP}", f"--hostname-override={NODE_NAME}", f"--node-labels={labels}",
                "--v=1"]

    def _ready(self) -> bool:
        node = json.loads(self.plane.kubectl("get", "node", NODE_NAME, "-o", "json").stdout or "{}")
        conditions = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
        gpus = node.get("status", {}).get("allocatable", {}).get("nvidia.com/gpu")
        return conditions.get("Ready") == "True" and gpus == str(GPUS)

    def _wait(self, check, what: str, deadline: float) -> None:
        wait_while_running(self.procs, self.log, check, what, deadline, tail=20)

    def log(self, name: str, lines: int = 40) -> str:
        try:
            return "\n".join((self.dir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # ----- images ---------------------------------------------------------------------------------

    def ctr(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run ``ctr`` against this node's containerd, in the Kubernetes namespace."""
        return subprocess.run(["ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args],
                              input=input, capture_output=True, timeout=600)

    def import_archive(self, archive: Path, *tags: str) -> None:
        """Import an image archive (docker save or OCI); tag it under ``tags`` too."""
        result = self.ctr("images", "import", str(archive))
        if result.returncode != 0:
            raise RuntimeError(f"ctr images import {archive}: {result.stderr.decode(errors='replace')}")
        names = [line.split()[1] for line in result.stdout.decode().splitlines()
                 if line.startswith("unpacking")]
        source = names[0].split("@")[0] if names else None
        for tag in tags:
            if source and source != tag:
                self.tag(source, tag)

    def import_image(self, kind: str, *tags: str) -> None:
        """Import ``dfk8s-<kind>:dev`` from the archive hack/cluster/images.sh saved; tag it ``tags`` too."""
        archive = image_archive(kind)
        check_free_disk(self.dir, archive)
        started = time.monotonic()
        self.import_archive(archive, *tags)
        print(f"imported {archive.name} ({archive.stat().st_size / 1e9:.1f} GB) in "
              f"{time.monotonic() - started:.0f} s", flush=True)

    def tag(self, source: str, target: str) -> None:
        """Give an image on the node another name (``ctr images tag``)."""
        result = self.ctr("images", "tag", "--force", _full_name(source), _full_name(target))
        if result.returncode != 0:
            raise RuntimeError(f"ctr images tag {source} {target}: {result.stderr.decode(errors='replace')}")

    # ----- stop -----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the plugin, the kubelet, every container and its shim, containerd; remove the cgroups."""
        from tests.cluster.controlplane import stop_process

        for name in ("fake-gpu", "kubelet"):
            if name in self.procs:
                stop_process(self.procs.pop(name))
        _kill_containers(self.cgroup_root, self.socket)  # as a node that dies: no graceful stop
        if "containerd" in self.procs:
            stop_process(self.procs.pop("containerd"))
        _remove_cgroups(self.cgroup_root)
        from tests.cluster.sandbox import unmount_below

        unmount_below(self.dir)  # the kubelet's root and pods' volumes, containerd's snapshots

    def cleanup_state(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
