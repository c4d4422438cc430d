"""The cluster tests: a real control plane (tests/cluster/controlplane.py) and the node agent.

`make test-cluster` builds the binaries (hack/cluster/build.sh), sets DFK8S_CLUSTER_TESTS=1 and runs
this folder once per pinned Kubernetes version (DFK8S_KUBE_VERSION); plain `make test` does not
collect it. One control plane per session (per version) serves every test; each test uses its own
run ids, and namespaces where it needs a clean one.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import time
import uuid
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


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/cluster/" in str(item.fspath):
            item.add_marker(pytest.mark.cluster)


class Cluster:
    """The running control plane and node agent, with the helpers the tests share."""

    def __init__(self, plane, agent):
        from kubernetes import client, config

        self.plane, self.agent = plane, agent
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
        import json

        return json.loads(response.data)["status"]["token"]

    def pods(self, namespace: str, selector: str = "") -> list[dict]:
        import json

        response = self.core.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False)
        return json.loads(response.data)["items"]

    def job(self, namespace: str, name: str) -> dict | None:
        import json

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
        """Poll ``check()`` until it returns something truthy; fail naming ``what`` (and agent problems)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(interval)
        raise AssertionError(
            f"timed out after {timeout:.0f} s waiting for {what}; agent problems: {self.agent.problems[-5:]}"
        )

    def pod_logs(self, namespace: str) -> str:
        """Every pod's log in a namespace, for failure messages."""
        out = []
        for pod in self.pods(namespace):
            name = pod["metadata"]["name"]
            try:
                text = self.core.read_namespaced_pod_log(name, namespace)
            except Exception as exc:
                text = f"({exc})"
            out.append(f"==> {name} ({pod.get('status', {}).get('phase')})\n{text}")
        return "\n".join(out)


@pytest.fixture(scope="session")
def cluster():
    """The control plane of $DFK8S_KUBE_VERSION (default: the newest pinned) and the node agent."""
    from tests.cluster.controlplane import ControlPlane
    from tests.cluster.node_agent import NodeAgent

    plane = ControlPlane(os.environ.get("DFK8S_KUBE_VERSION"))
    agent = None
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):  # `kill` of the test run: stop everything, then die of it
        if agent is not None:
            agent.stop()
        plane.stop()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    try:
        plane.start()
        agent = NodeAgent(plane).start()
        yield Cluster(plane, agent)
    finally:
        if agent is not None:
            agent.stop()
        plane.stop()
        signal.signal(signal.SIGTERM, previous)


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
def kube_env(cluster, batch_namespace, tmp_path, monkeypatch, s3_env):
    """$KUBECONFIG: the admin of the local cluster, namespace batch; S3 env for this process."""
    monkeypatch.delenv("DFK8S_JOBS_DIR", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", cluster.kubeconfig(tmp_path / "kubeconfig", batch_namespace))
    return cluster


@pytest.fixture
def run_id():
    """A run id of its own for each test (runs share the namespace)."""
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def held(cluster):
    """Hold pods in ContainerCreating (a slow image pull) while a test acts; released at the end."""
    yield cluster.agent
    cluster.agent.release()
