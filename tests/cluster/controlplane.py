"""A real Kubernetes cluster: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, and one node.

Test and development code (never shipped in the dfk8s package). The binaries are the ones
``hack/cluster/build.sh`` builds from their Go modules into ``$DFK8S_CLUSTER_CACHE`` (default
``~/.cache/dfk8s/cluster``), one folder per version. The set-up follows a kubeadm cluster's:

* a CA; the API server's serving certificate (IP SANs 127.0.0.1, the node IP and the service IP, DNS
  localhost and kubernetes.default.svc); client certificates for the admin (``O=system:masters``),
  the controller-manager, the scheduler, the node (``system:node:<name>``) and the API server's calls
  to the kubelet (bound to ``system:kubelet-api-admin``); a service-account RSA key pair;
* kube-apiserver with ``Node,RBAC`` authorization, the default admission plugins (PodSecurity and
  ServiceAccount among them) plus NodeRestriction, service-account token signing and issuer
  ``https://kubernetes.default.svc``;
* kube-controller-manager running the job, ttl-after-finished, garbage-collector, serviceaccount,
  serviceaccount-token, namespace, podgc, node-lifecycle and root-ca-cert-publisher controllers, each
  with its own service-account credentials;
* the node (:mod:`tests.cluster.node`): the real kubelet and containerd running this checkout's images.

The test session (and ``up``) first enters namespaces of its own (:mod:`tests.cluster.sandbox`): a
network where the node has a non-loopback IP, and a mount table where /var/lib is an overlay. The API
server listens on the node IP (pods reach it as the ``kubernetes`` Service); a shell outside reaches it
and S3 through relays on 127.0.0.1. Each process runs in its own process group and is stopped with it:
by :meth:`ControlPlane.stop`, at interpreter exit (atexit), on SIGTERM, and, should this process die
without cleaning up, by the kernel (``PR_SET_PDEATHSIG``).

Usage from a shell (``make cluster-up`` / ``make cluster-down``)::

    python -m tests.cluster.controlplane up [--version v1.37.2] [--dir .cluster] [--images cpu,gpu]
    python -m tests.cluster.controlplane down [--dir .cluster]
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from dfk8s.ports import listen_port
from tests.helpers.processes import die_with_parent, wait_while_running

REPO = Path(__file__).resolve().parents[2]
HACK = REPO / "hack" / "cluster"
CACHE = Path(os.environ.get("DFK8S_CLUSTER_CACHE") or Path("~/.cache/dfk8s/cluster").expanduser())
#: The service range is an allocation only: nothing ever routes to it here.
SERVICE_CIDR = "10.96.0.0/16"
CONTROLLERS = (
    "job-controller",
    "ttl-after-finished-controller",
    "garbage-collector-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "namespace-controller",
    "pod-garbage-collector-controller",
    "root-ca-certificate-publisher-controller",
    # Binds PersistentVolumeClaims to matching PersistentVolumes, as in a cluster with static volumes
    # (no provisioner runs here); the scheduler places no pod whose claim is unbound.
    "persistentvolume-binder-controller",
    # Takes the not-ready taint off a node once its kubelet reports Ready, as in any cluster.
    "node-lifecycle-controller",
)


def kube_versions() -> list[str]:
    """The Kubernetes versions pinned under hack/cluster (``kube-<minor>/VERSION``), oldest first."""
    found = [(HACK / d / "VERSION").read_text().strip() for d in os.listdir(HACK) if d.startswith("kube-")]
    return sorted(found, key=lambda v: tuple(int(p) for p in v.lstrip("v").split(".")))


def resolve_version(wanted: str | None) -> str:
    """Map ``1.33``, ``v1.33.13`` or None (the newest) to a pinned version."""
    versions = kube_versions()
    if not wanted:
        return versions[-1]
    wanted = wanted.lstrip("v")
    for version in versions:
        if version.lstrip("v") == wanted or version.lstrip("v").startswith(wanted + "."):
            return version
    raise SystemExit(f"no pinned Kubernetes {wanted} in {HACK} (have {', '.join(versions)})")


def module_version(folder: str, module: str) -> str:
    """The version of ``module`` the go.mod in ``hack/cluster/<folder>`` requires (no Go needed)."""
    for line in (HACK / folder / "go.mod").read_text().splitlines():
        parts = line.split()
        if module in parts:
            return parts[parts.index(module) + 1]
    raise RuntimeError(f"{module} not in hack/cluster/{folder}/go.mod")


def binaries(version: str, need=("kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd")):
    """Paths of the built binaries; raises with the command to build them when a needed one is missing."""
    kube = CACHE / f"kube-{version}"
    etcd = CACHE / f"etcd-{module_version('etcd', 'go.etcd.io/etcd/server/v3')}"
    helm = CACHE / f"helm-{module_version('helm', 'helm.sh/helm/v3')}"
    cni = CACHE / f"cni-{module_version('cni', 'github.com/containernetworking/plugins')}"
    fake_gpu = hashlib.sha256(b"".join((HACK / "fake-gpu" / f).read_bytes() for f in ("go.mod", "main.go")))
    paths = {name: kube / name for name in ("kube-apiserver", "kube-controller-manager", "kube-scheduler",
                                            "kubectl", "kubelet")}
    paths |= {"etcd": etcd / "etcd", "helm": helm / "helm", "cni": cni / "ptp",
              "fake-gpu": CACHE / f"fake-gpu-{fake_gpu.hexdigest()[:12]}" / "fake-gpu"}
    missing = [name for name in need if not paths[name].is_file()]
    if missing:
        raise RuntimeError(
            f"not built: {', '.join(missing)} (in {CACHE}): run hack/cluster/build.sh {version} first"
        )
    return paths


# ----- certificates -----------------------------------------------------------------------------


class Certs:
    """The cluster's CA and every key pair the components need, written under ``folder``."""

    def __init__(self, folder: Path):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        self._x509, self._hashes, self._ser, self._rsa = x509, hashes, serialization, rsa
        self._eku, self._oid = ExtendedKeyUsageOID, NameOID
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.ca_key = self._key("ca")
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dfk8s-test-ca")])
        now = datetime.datetime.now(datetime.UTC)
        self.ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(self.ca_key, hashes.SHA256())
        )
        self.ca = self._write("ca.crt", self.ca_cert.public_bytes(serialization.Encoding.PEM))
        # The service-account signing key pair (the controller-manager signs legacy tokens with it too).
        sa_key = self._key("sa")
        self.sa_key = folder / "sa.key"
        self.sa_pub = self._write(
            "sa.pub",
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )

    def _key(self, name: str):
        key = self._rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._write(
            f"{name}.key",
            key.private_bytes(
                self._ser.Encoding.PEM, self._ser.PrivateFormat.TraditionalOpenSSL, self._ser.NoEncryption()
            ),
        )
        return key

    def _write(self, name: str, data: bytes) -> Path:
        path = self.folder / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    def issue(
        self, name: str, common_name: str, *, orgs=(), server: bool = False, client: bool = True, ips=()
    ) -> tuple[Path, Path]:
        """Write ``name.crt`` / ``name.key`` signed by the CA; server certs get loopback SANs and ``ips``."""
        x509, oid = self._x509, self._oid
        key = self._key(name)
        subject = [x509.NameAttribute(oid.ORGANIZATION_NAME, org) for org in orgs]
        subject.append(x509.NameAttribute(oid.COMMON_NAME, common_name))
        usages = ([self._eku.SERVER_AUTH] if server else []) + ([self._eku.CLIENT_AUTH] if client else [])
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(subject))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if server:
            sans = [
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.DNSName("localhost"),
                x509.DNSName("kubernetes"),
                x509.DNSName("kubernetes.default"),
                x509.DNSName("kubernetes.default.svc"),
                *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips),
            ]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.ca_key, self._hashes.SHA256())
        return self._write(
            f"{name}.crt", cert.public_bytes(self._ser.Encoding.PEM)
        ), self.folder / f"{name}.key"


def write_kubeconfig(path: Path, server: str, ca: Path, *, cert=None, key=None, token=None, namespace=None):
    """Write a one-context kubeconfig (client certificate or bearer token) and return its path."""
    import yaml

    user = {"token": token} if token else {"client-certificate": str(cert), "client-key": str(key)}
    context = {"cluster": "dfk8s", "user": "user"}
    if namespace:
        context["namespace"] = namespace
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "dfk8s", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": "user", "user": user}],
        "contexts": [{"name": "dfk8s", "context": context}],
        "current-context": "dfk8s",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


# ----- processes --------------------------------------------------------------------------------


def start_process(argv: list[str], log: Path, *, env=None, cwd=None) -> subprocess.Popen:
    """Start ``argv`` in a process group of its own, output to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace`` seconds, and reap the process."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything left in the group
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler.

    Args:
        version: a pinned Kubernetes version (``v1.37.2``) or minor (``1.37``); None: the newest.
        state_dir: where certificates, etcd data and logs go; None: a temporary folder removed on stop.
        node_ip: None: the API server on a free port of 127.0.0.1 (no node can join). An address: the
            node's (the test cluster's sandbox, :mod:`tests.cluster.sandbox`); the API server listens
            on :443 of every address, the node's and the ``kubernetes`` Service's ClusterIP among them,
            as pods' in-cluster configuration expects.
    """

    def __init__(self, version: str | None = None, state_dir: Path | None = None, *,
                 node_ip: str | None = None):
        self.version = resolve_version(version)
        self.bin = binaries(self.version)
        self.node_ip = node_ip
        self._own_dir = state_dir is None
        self.dir = Path(state_dir or tempfile.mkdtemp(prefix="dfk8s-cluster-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.apiserver_port = 0
        self.server = ""
        self.kubeconfig = self.dir / "admin.kubeconfig"
        self._stopped = False

    # ----- lifecycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 180.0) -> ControlPlane:
        """Start every component and wait until the API is ready and controllers work."""
        atexit.register(self.stop)
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        certs = self.certs = Certs(self.dir / "pki")
        if self.node_ip:
            from tests.cluster.sandbox import SERVICE_IP

            self.apiserver_port, bind, sans = 443, "0.0.0.0", [self.node_ip, SERVICE_IP]
            self.server = f"https://{self.node_ip}"
        else:
            self.apiserver_port, bind, sans = listen_port(), "127.0.0.1", []
            self.server = f"https://127.0.0.1:{self.apiserver_port}"
        api_cert = certs.issue("apiserver", "kube-apiserver", server=True, client=False, ips=sans)
        kubelet_client = certs.issue(
            "apiserver-kubelet-client", "kube-apiserver-kubelet-client", orgs=["kubeadm:cluster-admins"]
        )
        admin = certs.issue("admin", "kubernetes-admin", orgs=["system:masters"])
        self.admin_cert = admin
        write_kubeconfig(self.kubeconfig, self.server, certs.ca, cert=admin[0], key=admin[1])
        kcm = certs.issue("controller-manager", "system:kube-controller-manager")
        kcm_config = write_kubeconfig(
            self.dir / "controller-manager.kubeconfig", self.server, certs.ca, cert=kcm[0], key=kcm[1]
        )
        sched = certs.issue("scheduler", "system:kube-scheduler")
        sched_config = write_kubeconfig(
            self.dir / "scheduler.kubeconfig", self.server, certs.ca, cert=sched[0], key=sched[1]
        )

        etcd_port, etcd_peer = listen_port(), listen_port()
        self._run(
            "etcd",
            [
                str(self.bin["etcd"]),
                "--name",
                "default",
                "--data-dir",
                str(self.dir / "etcd"),
                "--listen-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{etcd_peer}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{etcd_peer}",
                "--initial-cluster",
                f"default=http://127.0.0.1:{etcd_peer}",
                "--log-level",
                "warn",
                # Test state is thrown away: no fsync keeps etcd from waiting on the disk.
                "--unsafe-no-fsync",
            ],
        )
        self._wait(lambda: _http_ok(f"http://127.0.0.1:{etcd_port}/health"), "etcd", deadline)

        self._run(
            "kube-apiserver",
            [
                str(self.bin["kube-apiserver"]),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                f"--bind-address={bind}",
                f"--advertise-address={self.node_ip or '127.0.0.1'}",
                f"--secure-port={self.apiserver_port}",
                # No kube-proxy runs: pods reach the API at the Service's ClusterIP, which the node's
                # interface holds, so the kubernetes Service's endpoints are not needed (and the
                # default reconciler would write a loopback address there, which validation refuses).
                "--endpoint-reconciler-type=none",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--client-ca-file={certs.ca}",
                f"--tls-cert-file={api_cert[0]}",
                f"--tls-private-key-file={api_cert[1]}",
                "--authorization-mode=Node,RBAC",
                # On top of the default plugins (NamespaceLifecycle, LimitRanger, ServiceAccount,
                # TaintNodesByCondition, PodSecurity, Priority, ..., ResourceQuota), as kubeadm does.
                "--enable-admission-plugins=NodeRestriction",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={certs.sa_pub}",
                f"--service-account-signing-key-file={certs.sa_key}",
                "--kubelet-preferred-address-types=InternalIP",
                f"--kubelet-client-certificate={kubelet_client[0]}",
                f"--kubelet-client-key={kubelet_client[1]}",
                "--allow-privileged=false",
                "--profiling=false",
                "--v=1",
            ],
        )
        self._wait(self._ready, "kube-apiserver /readyz", deadline)
        # `kubectl logs` and `exec` go through the kubelet, which asks the API server whether its
        # client may: bind that client to the kubelet API's admin role, as kubeadm does.
        self._create("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "kube-apiserver-kubelet-api-admin"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "system:kubelet-api-admin"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                          "name": "kube-apiserver-kubelet-client"}]})

        self._run(
            "kube-controller-manager",
            [
                str(self.bin["kube-controller-manager"]),
                f"--kubeconfig={kcm_config}",
                f"--authentication-kubeconfig={kcm_config}",
                f"--authorization-kubeconfig={kcm_config}",
                "--bind-address=127.0.0.1",
                f"--secure-port={listen_port()}",
                f"--cert-dir={self.dir / 'kcm-certs'}",
                f"--controllers={','.join(CONTROLLERS)}",
                f"--service-account-private-key-file={certs.sa_key}",
                f"--root-ca-file={certs.ca}",
                "--use-service-account-credentials=true",
                "--leader-elect=false",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--profiling=false",
                "--v=1",
            ],
        )
        self._run(
            "kube-scheduler",
            [
                str(self.bin["kube-scheduler"]),
                f"--kubeconfig={sched_config}",
                f"--authentication-kubeconfig={sched_config}",
                f"--authorization-kubeconfig={sched_config}",
                "--bind-address=127.0.0.1",
                f"--secure-port={listen_port()}",
                f"--cert-dir={self.dir / 'scheduler-certs'}",
                "--leader-elect=false",
                "--profiling=false",
                "--v=1",
            ],
        )
        # The serviceaccount controller makes "default" in every namespace, the root-CA publisher the
        # kube-root-ca.crt ConfigMap pods' token volumes read: both mean the controller-manager works.
        self._wait(
            lambda: self._exists("serviceaccounts", "default", "default"),
            "the default ServiceAccount (kube-controller-manager)",
            deadline,
        )
        self._wait(
            lambda: self._exists("configmaps", "default", "kube-root-ca.crt"),
            "the kube-root-ca.crt ConfigMap",
            deadline,
        )

    def stop(self) -> None:
        """Stop every component (scheduler and controllers first, etcd last); remove a temp state dir."""
        if self._stopped:
            return
        self._stopped = True
        for name in reversed(list(self.procs)):
            stop_process(self.procs[name])
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----- helpers ------------------------------------------------------------------------------

    def _run(self, name: str, argv: list[str]) -> None:
        self.procs[name] = start_process(argv, self.dir / f"{name}.log")

    def log(self, name: str, lines: int = 40) -> str:
        """The last ``lines`` lines of a component's log."""
        try:
            return "\n".join((self.dir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _wait(self, check, what: str, deadline: float) -> None:
        wait_while_running(self.procs, self.log, check, what, deadline, tail=15)

    def ssl_context(self) -> ssl.SSLContext:
        """A TLS context trusting the cluster CA, with the admin client certificate."""
        context = ssl.create_default_context(cafile=str(self.certs.ca))
        context.load_cert_chain(str(self.admin_cert[0]), str(self.admin_cert[1]))
        return context

    def _get(self, path: str):
        return urllib.request.urlopen(self.server + path, context=self.ssl_context(), timeout=5)

    def _ready(self) -> bool:
        with self._get("/readyz") as response:
            return response.status == 200

    def _create(self, path: str, body: dict) -> None:
        request = urllib.request.Request(self.server + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, context=self.ssl_context(), timeout=10).close()
        except urllib.error.HTTPError as exc:
            if exc.code != 409:
                raise

    def kubectl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        """Run the built kubectl as the cluster's admin."""
        return subprocess.run([str(self.bin["kubectl"]), "--kubeconfig", str(self.kubeconfig), *args],
                              input=input, capture_output=True, text=True, timeout=120)

    def _exists(self, resource: str, namespace: str, name: str) -> bool:
        with self._get(f"/api/v1/namespaces/{namespace}/{resource}/{name}") as response:
            return response.status == 200

    def env(self) -> dict[str, str]:
        """What a shell needs: KUBECONFIG, and helm and kubectl first on PATH."""
        path = os.pathsep.join(
            [str(self.bin["helm"].parent), str(self.bin["kubectl"].parent), os.environ.get("PATH", "")]
        )
        return {"KUBECONFIG": str(self.kubeconfig), "PATH": path}


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status == 200


# ----- make cluster-up / cluster-down -----------------------------------------------------------


def _relay(listener: socket.socket, target: tuple[str, int]) -> None:
    """Accept on ``listener`` forever and pipe each connection to ``target``, both ways.

    The listener was bound in the host's network namespace before the process entered the sandbox (a
    socket keeps the namespace it was made in); the connections to ``target`` are made in the sandbox.
    """

    def pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    while True:
        client, _ = listener.accept()
        try:
            upstream = socket.create_connection(target, timeout=10)
            upstream.settimeout(None)
        except OSError:
            client.close()
            continue
        for ends in ((client, upstream), (upstream, client)):
            threading.Thread(target=pipe, args=ends, daemon=True).start()


def _listen() -> socket.socket:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    return listener


def _serve(args) -> None:
    """The background process of ``up``: the cluster in its sandbox until SIGTERM.

    Inside the sandbox: the control plane, the node (containerd, the kubelet, the fake GPU plugin) with
    the images of hack/cluster/images.sh, SeaweedFS on the node's IP with a bucket ``dfk8s`` and a
    Secret ``s3`` (its keys) in namespace default, and the fake OpenAI/Gemini API on the node's IP with a
    Secret ``api`` (``DF_API_KEY``, any key). The host reaches the API server and S3 through two relays
    on 127.0.0.1; pods reach S3 and the fake API on the node's IP (no kube-proxy, no cluster DNS).
    """
    from dfk8s.testing.fake_api import FakeAPI, FakeConfig
    from tests.cluster import sandbox
    from tests.cluster.node import Node, cpu_image_tags, gpu_image_tags
    from tests.helpers.seaweed import start_seaweed

    folder = Path(args.dir).resolve()
    state = folder / "state"
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    api_relay, s3_relay = _listen(), _listen()  # in the host's network namespace
    sandbox.enter(state / "sandbox")
    plane = ControlPlane(args.version, state / "plane", node_ip=sandbox.NODE_IP)
    node = Node(plane, state / "node")
    seaweed = fake_api = None
    try:
        plane.start()
        node.start()
        node.import_image("cpu", *cpu_image_tags())
        if "gpu" in args.images.split(","):
            try:
                node.import_image("gpu", *gpu_image_tags())
            except RuntimeError as exc:  # FLUX pods need it; the rest runs without
                print(f"no GPU image on the node: {exc}", flush=True)
        seaweed = start_seaweed(host=sandbox.NODE_IP)
        seaweed.create_bucket("dfk8s")
        plane.kubectl("create", "secret", "generic", "s3",
                      f"--from-literal=AWS_ACCESS_KEY_ID={seaweed.access_key}",
                      f"--from-literal=AWS_SECRET_ACCESS_KEY={seaweed.secret_key}")
        fake_api = FakeAPI(FakeConfig(), host=sandbox.NODE_IP)
        fake_api.start()
        plane.kubectl("create", "secret", "generic", "api",
                      "--from-literal=DF_API_KEY=any-key-the-fake-takes")
        s3_port = int(seaweed.endpoint.rsplit(":", 1)[1])
        for listener, target in ((api_relay, (sandbox.NODE_IP, plane.apiserver_port)),
                                 (s3_relay, (sandbox.NODE_IP, s3_port))):
            threading.Thread(target=_relay, args=(listener, target), daemon=True).start()
        api_port, s3_local = api_relay.getsockname()[1], s3_relay.getsockname()[1]
        write_kubeconfig(folder / "kubeconfig", f"https://127.0.0.1:{api_port}", plane.certs.ca,
                         cert=plane.admin_cert[0], key=plane.admin_cert[1])
        (folder / "env").write_text(
            f"# . .cluster/env: the local cluster (Kubernetes {plane.version}) and its S3 (SeaweedFS)\n"
            f"export KUBECONFIG={folder / 'kubeconfig'}\n"
            f"export PATH={plane.bin['helm'].parent}:{plane.bin['kubectl'].parent}:$PATH\n"
            f"export AWS_ENDPOINT_URL=http://127.0.0.1:{s3_local}\n"
            f"export DFK8S_CLUSTER_S3_ENDPOINT={seaweed.endpoint}\n"
            f"export AWS_ACCESS_KEY_ID={seaweed.access_key} AWS_SECRET_ACCESS_KEY={seaweed.secret_key}\n"
            "export AWS_DEFAULT_REGION=us-east-1\n"
            f"# the fake OpenAI/Gemini API, for --api-url (pods reach it; this shell does not)\n"
            f"export DFK8S_FAKE_API_URL={fake_api.url}/v1\n"
        )
        (folder / "ready").write_text(f"https://127.0.0.1:{api_port}\n")
        while not stop["now"]:
            time.sleep(0.5)
    finally:
        if fake_api is not None:
            fake_api.stop()
        if seaweed is not None:
            seaweed.stop()
        node.stop()
        plane.stop()
        sandbox.unmount()
        for name in ("ready", "pid"):
            (folder / name).unlink(missing_ok=True)


def _up(args) -> int:
    folder = Path(args.dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    pid_file = folder / "pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), 0)
            print(f"already running (pid {pid_file.read_text().strip()}): make cluster-down first")
            return 1
        except (ProcessLookupError, ValueError):
            pid_file.unlink()
    shutil.rmtree(folder / "state", ignore_errors=True)
    (folder / "ready").unlink(missing_ok=True)
    version = resolve_version(args.version)
    binaries(version)
    log = open(folder / "cluster.log", "ab")  # noqa: SIM115 - handed to the background process
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.cluster.controlplane",
            "serve",
            "--dir",
            str(folder),
            "--version",
            version,
            "--images",
            args.images,
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    pid_file.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + 600  # the images' import is most of it (the GPU image: ~6 GB)
    while time.monotonic() < deadline:
        if (folder / "ready").exists():
            from tests.cluster.node import GPUS, NODE_NAME

            print(
                f"Kubernetes {version} is up at {(folder / 'ready').read_text().strip()} (node {NODE_NAME}, "
                f"{GPUS} fake GPUs; the dfk8s images imported); state in {folder / 'state'}"
            )
            env = os.path.relpath(folder / "env")
            print(f"  . {env}   # KUBECONFIG, helm and kubectl on PATH, S3 (bucket dfk8s)")
            return 0
        if proc.poll() is not None:
            print(f"the control plane exited ({proc.returncode}); see {folder / 'cluster.log'}")
            pid_file.unlink(missing_ok=True)
            return 1
        time.sleep(0.5)
    print(f"not ready after 600 s; see {folder / 'cluster.log'}; stopping it")
    os.kill(proc.pid, signal.SIGTERM)
    return 1


def _down(args) -> int:
    folder = Path(args.dir).resolve()
    pid_file = folder / "pid"
    if not pid_file.exists():
        print("no local control plane running")
        return 0
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pid_file.unlink(missing_ok=True)
        print("no local control plane running")
        return 0
    for _ in range(120):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.25)
    else:
        os.kill(pid, signal.SIGKILL)
    from tests.cluster.node import reap

    reap(folder / "state" / "node")  # what a killed cluster left: containers, their shims, cgroups
    pid_file.unlink(missing_ok=True)
    for name in ("kubeconfig", "env", "ready"):
        (folder / name).unlink(missing_ok=True)
    shutil.rmtree(folder / "state", ignore_errors=True)  # keys, tokens, etcd data; cluster.log stays
    print("local control plane stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``up`` starts the control plane and a node agent in the background; ``down`` stops them."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.cluster.controlplane",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["up", "down", "serve"])
    parser.add_argument(
        "--version",
        default=os.environ.get("DFK8S_KUBE_VERSION"),
        help="Kubernetes version or minor (default: the newest pinned)",
    )
    parser.add_argument("--dir", default=str(REPO / ".cluster"), help="where kubeconfig, env and state go")
    parser.add_argument("--images", default="cpu,gpu",
                        help="the dfk8s images to import into the node (cpu,gpu; the GPU one takes ~2 min)")
    args = parser.parse_args(argv)
    if args.command == "up":
        return _up(args)
    if args.command == "down":
        return _down(args)
    _serve(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
