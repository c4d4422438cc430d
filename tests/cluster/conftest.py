"""The cluster tests: a real control plane (controlplane.py) and a real node (node.py), in a sandbox.

`make test-cluster` builds the binaries (hack/cluster/build.sh) and the images (hack/cluster/images.sh),
sets DFK8S_CLUSTER_TESTS=1 and runs this folder once per pinned Kubernetes version
(DFK8S_KUBE_VERSION); plain `make test` does not collect it. At start-up the test process moves into
network and mount namespaces of its own (sandbox.py): everything it starts from then on (etcd, the
control plane, containerd, the kubelet and its pods, SeaweedFS, the fake API) lives there, and the host
is left as it was. One cluster per session serves every test; each test uses its own run ids, and
namespaces where it needs a clean one.

The pods are the product's, from the product's images (dfk8s-cpu:dev, and dfk8s-gpu:dev for FLUX),
imported into the node's containerd under the tags the job profiles name. Two test-only settings,
neither in the pods' specs: the job profiles' resource *requests* are scaled down to fit this
2-core machine (limits stay), and the node's GPUs are a fake device plugin's.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

CLUSTER_TESTS = os.environ.get("DFK8S_CLUSTER_TESTS") == "1"
collect_ignore_glob = [] if CLUSTER_TESTS else ["test_*.py"]

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "charts" / "dfk8s"
#: The namespace most tests submit to: the chart installed (release "dfk8s"), restricted pods only.
NS = "batch"
#: The Secret references and service account every submit in these tests uses (the chart installs them).
CREDENTIALS = ("--api-key-secret", "api/DF_API_KEY", "--s3-secret", "s3",
               "--service-account", "dfk8s-reducer")
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}
#: What the tests' job profiles request per pod, at most: the real profiles ask for a real node's share.
TEST_REQUESTS = {"cpu": "50m", "memory": "64Mi"}

_state: dict = {}


def pytest_configure(config):
    """Enter the sandbox before anything starts: every server of the session must live in it."""
    if CLUSTER_TESTS and "dir" not in _state:
        from tests.cluster import sandbox

        _state["dir"] = Path(tempfile.mkdtemp(prefix="dfk8s-cluster-"))
        sandbox.enter(_state["dir"] / "sandbox")


def pytest_unconfigure(config):
    if "dir" in _state:
        from tests.cluster import sandbox

        sandbox.unmount()
        shutil.rmtree(_state.pop("dir"), ignore_errors=True)


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/cluster/" in str(item.fspath):
            item.add_marker(pytest.mark.cluster)


class Cluster:
    """The running control plane and its node, with the helpers the tests share."""

    def __init__(self, plane, node):
        from kubernetes import client, config

        self.plane, self.node = plane, node
        self.api = config.new_client_from_config(config_file=str(plane.kubeconfig))
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.rbac = client.RbacAuthorizationV1Api(self.api)
        self.version = plane.version

    def kubeconfig(self, path: Path, namespace: str, *, token: str | None = None) -> str:
        """Write a kubeconfig for ``namespace``: admin's client certificate, or a bearer token."""
        from tests.cluster.controlplane import write_kubeconfig

        if token:
            return str(
                write_kubeconfig(
                    path, self.plane.server, self.plane.certs.ca, token=token, namespace=namespace
                )
            )
        cert, key = self.plane.admin_cert
        return str(
            write_kubeconfig(
                path, self.plane.server, self.plane.certs.ca, cert=cert, key=key, namespace=namespace
            )
        )

    def create_namespace(self, name: str, labels: dict | None = None) -> str:
        from kubernetes.client.exceptions import ApiException

        body = {"metadata": {"name": name, "labels": {**RESTRICTED, **(labels or {})}}}
        try:
            self.core.create_namespace(body)
        except ApiException as exc:
            if exc.status != 409:
                raise
        self.wait_for(
            lambda: self._exists(self.core.read_namespaced_service_account, "default", name),
            what=f"the default ServiceAccount of {name}",
        )
        return name

    @staticmethod
    def _exists(read, *args) -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            read(*args)
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    def create_secret(self, namespace: str, name: str, data: dict[str, str]) -> None:
        from kubernetes.client.exceptions import ApiException

        body = {
            "metadata": {"name": name},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        }
        try:
            self.core.create_namespaced_secret(namespace, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.core.replace_namespaced_secret(name, namespace, body)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run the built helm against this cluster."""
        result = subprocess.run(
            [str(self.plane.bin["helm"]), "--kubeconfig", str(self.plane.kubeconfig), *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def kubectl(self, *args: str, input: str | None = None, kubeconfig: str | None = None):
        """Run the built kubectl against this cluster."""
        return subprocess.run(
            [str(self.plane.bin["kubectl"]), "--kubeconfig", kubeconfig or str(self.plane.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def sa_token(self, namespace: str, name: str) -> str:
        """A token of a ServiceAccount (TokenRequest), as `kubectl create token` makes."""
        response = self.core.create_namespaced_service_account_token(
            name, namespace, {"spec": {"expirationSeconds": 3600}}, _preload_content=False
        )
        return json.loads(response.data)["status"]["token"]

    def pods(self, namespace: str, selector: str = "") -> list[dict]:
        response = self.core.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False)
        return json.loads(response.data)["items"]

    def job(self, namespace: str, name: str) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return json.loads(self.batch.read_namespaced_job(name, namespace, _preload_content=False).data)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def events(self, namespace: str, name: str) -> list[str]:
        listed = self.core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
        return [f"{e.reason}: {e.message}" for e in listed.items]

    def wait_for(self, check, *, what: str, timeout: float = 120.0, interval: float = 0.3):
        """Poll ``check()`` until it returns something truthy; fail naming ``what`` (and waiting pods)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; pods: {self.pod_states()}")

    def pod_states(self) -> list[str]:
        """Each pod of the cluster that is not running or done, with why, for failure messages."""
        states = []
        for pod in json.loads(self.core.list_pod_for_all_namespaces(_preload_content=False).data)["items"]:
            status_of = pod.get("status") or {}
            for status in [*(status_of.get("initContainerStatuses") or ()),
                           *(status_of.get("containerStatuses") or ())]:
                waiting = (status.get("state") or {}).get("waiting")
                if waiting:
                    reason, message = waiting.get("reason"), waiting.get("message", "")
                    states.append(f"{pod['metadata']['name']}: {reason} {message}")
            if (pod.get("status") or {}).get("phase") == "Pending" and not pod["spec"].get("nodeName"):
                states.append(f"{pod['metadata']['name']}: not scheduled")
        return states

    def pod_logs(self, namespace: str) -> str:
        """Every container's log of every pod in a namespace (sidecars included), for failure messages."""
        out = []
        for pod in self.pods(namespace):
            name = pod["metadata"]["name"]
            for container in [*(pod["spec"].get("initContainers") or ()), *pod["spec"]["containers"]]:
                try:
                    text = self.core.read_namespaced_pod_log(name, namespace, container=container["name"],
                                                             tail_lines=60)
                except Exception as exc:
                    text = f"({exc})"
                out.append(f"==> {name}/{container['name']} ({pod.get('status', {}).get('phase')})\n{text}")
        return "\n".join(out)


@pytest.fixture(scope="session")
def cluster():
    """The control plane of $DFK8S_KUBE_VERSION (default: the newest pinned) and its node, CPU image on it."""
    from tests.cluster.controlplane import ControlPlane
    from tests.cluster.node import Node, cpu_image_tags
    from tests.cluster.sandbox import NODE_IP

    plane = ControlPlane(os.environ.get("DFK8S_KUBE_VERSION"), _state["dir"] / "plane", node_ip=NODE_IP)
    node = Node(plane, _state["dir"] / "node")
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):  # `kill` of the test run: stop everything, then die of it
        node.stop()
        plane.stop()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    try:
        plane.start()
        node.start()
        node.import_image("cpu", *cpu_image_tags())
        yield Cluster(plane, node)
    finally:
        node.stop()
        plane.stop()
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="session")
def gpu_image(cluster):
    """The GPU image (FLUX workers) on the node, under the tag the text2image profile names."""
    from tests.cluster.node import gpu_image_tags

    cluster.node.import_image("gpu", *gpu_image_tags())
    return gpu_image_tags()[-1]


@pytest.fixture(scope="session")
def seaweed():
    """SeaweedFS on the node's IP: the test process and the pods reach it at the same address."""
    from tests.cluster.sandbox import NODE_IP
    from tests.helpers.seaweed import start_seaweed

    server = start_seaweed(host=NODE_IP)
    yield server
    server.stop()


@pytest.fixture
def fake_api():
    """The fake OpenAI/Gemini server on the node's IP, where pods reach it."""
    from dfk8s.testing.fake_api import FakeAPI, FakeConfig
    from tests.cluster.sandbox import NODE_IP

    api = FakeAPI(FakeConfig(), host=NODE_IP)
    api.start()
    yield api
    api.stop()


@pytest.fixture(scope="session")
def jobs_dir(tmp_path_factory) -> Path:
    """The packaged job profiles with every resource request capped at TEST_REQUESTS (limits kept)."""
    from tests.cluster.node import small_profiles

    return small_profiles(tmp_path_factory.mktemp("jobs"), TEST_REQUESTS)


@pytest.fixture(scope="session")
def batch_namespace(cluster, seaweed):
    """Namespace ``batch`` (restricted), the chart installed as release dfk8s, the run's Secrets."""
    cluster.create_namespace(NS)
    cluster.helm("install", "dfk8s", str(CHART_DIR), "--namespace", NS)
    cluster.create_secret(NS, "api", {"DF_API_KEY": "test-key-not-secret"})
    cluster.create_secret(
        NS, "s3", {"AWS_ACCESS_KEY_ID": seaweed.access_key, "AWS_SECRET_ACCESS_KEY": seaweed.secret_key}
    )
    return NS


@pytest.fixture
def kube_env(cluster, batch_namespace, tmp_path, monkeypatch, s3_env, jobs_dir):
    """$KUBECONFIG: the admin of the local cluster, namespace batch; S3 env for this process."""
    monkeypatch.setenv("DFK8S_JOBS_DIR", str(jobs_dir))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", cluster.kubeconfig(tmp_path / "kubeconfig", batch_namespace))
    return cluster


@pytest.fixture
def run_id():
    """A run id of its own for each test (runs share the namespace)."""
    return f"t{uuid.uuid4().hex[:8]}"


@dataclass
class Claim:
    """A bound PersistentVolumeClaim of namespace batch and the host folder its PersistentVolume is."""

    name: str
    folder: Path


@pytest.fixture
def claim(kube_env) -> Claim:
    """A PVC bound (by the real PV controller) to a hostPath PV on a fresh folder; both deleted after."""
    from kubernetes.client.exceptions import ApiException

    cluster = kube_env
    name = f"hf-{uuid.uuid4().hex[:8]}"
    folder = cluster.node.dir / "volumes" / name
    folder.mkdir(parents=True)
    folder.chmod(0o777)  # a hostPath volume keeps its owner (no fsGroup): the pods' uid must write it
    pv_name = f"{NS}-{name}"
    cluster.core.create_persistent_volume(
        {
            "metadata": {"name": pv_name},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteMany"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "hostPath": {"path": str(folder), "type": "Directory"},
                "claimRef": {"namespace": NS, "name": name},
            },
        }
    )
    cluster.core.create_namespaced_persistent_volume_claim(
        NS,
        {
            "metadata": {"name": name},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )
    try:
        cluster.wait_for(
            lambda: cluster.core.read_namespaced_persistent_volume_claim(name, NS).status.phase == "Bound",
            what=f"claim {name} bound to {pv_name}",
        )
        yield Claim(name, folder)
    finally:
        for delete in (
            lambda: cluster.core.delete_namespaced_persistent_volume_claim(name, NS),
            lambda: cluster.core.delete_persistent_volume(pv_name),
        ):
            try:
                delete()
            except ApiException as exc:
                if exc.status != 404:
                    raise


@pytest.fixture
def held(cluster):
    """Images not on the node yet: pods that run them wait in Pending (ErrImagePull) until released."""
    return ImageGate(cluster.node)


class ImageGate:
    """Holds pods before they start, as a slow or missing image does on a real node.

    :meth:`image` names an image that is not on the node; a pod that runs it stays Pending, its
    container waiting in ErrImagePull / ImagePullBackOff (nothing listens where the name points). The
    test passes it to ``submit --image`` or ``--reducer-image``. :meth:`release` tags the CPU image
    under that name: the kubelet finds it at its next try (within its 10 s back-off) and starts the pod.
    """

    def __init__(self, node):
        self.node = node
        self.names: list[str] = []

    def image(self, what: str = "map") -> str:
        name = f"127.0.0.1:9/held/dfk8s-cpu:{what}-{uuid.uuid4().hex[:8]}"
        self.names.append(name)
        return name

    def release(self, name: str | None = None) -> None:
        """Put the CPU image under ``name`` (default: every name given out)."""
        from tests.cluster.node import cpu_image_tags

        for target in [name] if name else self.names:
            self.node.tag(cpu_image_tags()[-1], target)
