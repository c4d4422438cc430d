"""`dfk8s model pull --pvc NAME --wait` and `dfk8s model list --pvc NAME` on the real control plane.

The real kube-apiserver, Job controller, PV controller and scheduler; the pull and list pods run on the
real kubelet, from the CPU image (tests/cluster/node.py). Two stand-ins, each because no real part can
run here:

* The Hugging Face Hub cannot be reached (tests may only talk to their own servers): the pods download
  from tests.helpers.fake_hub on the node's IP, which speaks the Hub's file API to the real
  huggingface_hub client. The Job gets it as a user gives a Hub mirror, ``--hf-endpoint URL`` (its
  ``HF_ENDPOINT``).
* No storage driver runs: the claim is a real PersistentVolumeClaim, bound by the real PV controller to
  a ``hostPath`` PersistentVolume on a folder of the node's, which the kubelet mounts into the pod.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from dfk8s.cli import cli
from dfk8s.errors import SpecError
from dfk8s.kube.model_jobs import MODEL_JOB_LABEL, pull_job_name
from dfk8s.models.hub import format_bytes, list_cache
from dfk8s.ports import listen_port
from tests.cluster.conftest import NS
from tests.cluster.sandbox import NODE_IP
from tests.helpers.fake_hub import FakeHub

MODEL = "tiny-org/tiny-pipe"
WEIGHTS = "vae/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A one-component diffusers repo (model_index.json, a config, 2 MiB of weights never loaded)."""
    folder = tmp_path_factory.mktemp("hub") / "tiny-pipe"
    (folder / "vae").mkdir(parents=True)
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": "X", "vae": ["diffusers", "AutoencoderKL"]})
    )
    (folder / "vae" / "config.json").write_text("{}")
    (folder / WEIGHTS).write_bytes(os.urandom(2 * 2**20))
    return folder


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _in_thread(*args):
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", invoke(*args)), daemon=True)
    thread.start()
    return thread, box


def _job_pods(cluster, name: str) -> list[dict]:
    return cluster.pods(NS, f"{MODEL_JOB_LABEL}={name}")


def _finished(job: dict | None) -> str | None:
    for condition in ((job or {}).get("status") or {}).get("conditions") or ():
        if condition["type"] in ("Complete", "Failed") and condition["status"] == "True":
            return condition["type"]
    return None


def _delete_job(cluster, name: str) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        cluster.batch.delete_namespaced_job(name, NS, propagation_policy="Background")
    except ApiException as exc:
        if exc.status != 404:
            raise


def test_should_follow_the_pull_job_and_replace_a_finished_one_when_wait_is_set(kube_env, claim, repo, held):
    cluster = kube_env
    name = pull_job_name(MODEL, claim.name)
    port = listen_port()
    hub = FakeHub({MODEL: repo}, host=NODE_IP)
    try:
        # The Hub is not up yet: the first pod cannot reach it and fails (exit 1); the Job retries it.
        thread, box = _in_thread(
            "model", "pull", MODEL, "--pvc", claim.name, "--hf-endpoint", f"http://{NODE_IP}:{port}", "--wait"
        )
        first = cluster.wait_for(
            lambda: [p for p in _job_pods(cluster, name) if p["status"].get("phase") == "Failed"],
            what="the first pull pod failed",
            timeout=180,
        )[0]
        assert first["spec"]["containers"][0]["command"][:4] == ["dfk8s", "model", "pull", MODEL]
        assert "cannot download" in cluster.core.read_namespaced_pod_log(first["metadata"]["name"], NS)
        hub.start(port)
        thread.join(300)
        assert not thread.is_alive(), cluster.pod_logs(NS)
        result = box["result"]
        assert result.exit_code == 0, (result.output, cluster.pod_logs(NS))
        assert "pod attempt 1 failed" in result.stderr
        assert f"submit with --model-cache-pvc {claim.name}" in result.stderr
        # The second pod fetched the weights from the stand-in Hub into the claim's folder.
        assert WEIGHTS in hub.fetched()
        (cached,) = list_cache(claim.folder / "huggingface")
        assert cached.model == MODEL and cached.complete and cached.commit == hub.commit(MODEL)
        assert (Path(cached.snapshot) / WEIGHTS).read_bytes() == (repo / WEIGHTS).read_bytes()

        # Pulling again once it finished: the old Job is replaced, not refused as "already exists". Its
        # pod waits for an image the node does not have yet, so the new Job is still going...
        again = invoke("model", "pull", MODEL, "--pvc", claim.name, "--hf-endpoint", hub.url,
                       "--image", held.image("pull"))
        assert again.exit_code == 0, again.output
        assert "created job" in again.stderr
        job = cluster.job(NS, name)
        assert _finished(job) is None
        # ... and a pull that is still going is left alone (no second download).
        third = invoke("model", "pull", MODEL, "--pvc", claim.name, "--hf-endpoint", hub.url)
        assert third.exit_code == 0 and "already pulling" in third.stderr
        assert cluster.job(NS, name)["metadata"]["uid"] == job["metadata"]["uid"]
    finally:
        _delete_job(cluster, name)
        hub.stop()


def test_should_exit_42_with_the_log_line_when_the_pull_cannot_succeed(kube_env, claim, repo):
    cluster = kube_env
    name = pull_job_name("some-org/private", claim.name)
    try:
        with FakeHub({MODEL: repo}, host=NODE_IP) as hub:  # serves MODEL only: no some-org/private
            thread, box = _in_thread(
                "model", "pull", "some-org/private", "--pvc", claim.name, "--hf-endpoint", hub.url, "--wait"
            )
            thread.join(300)
        assert not thread.is_alive(), cluster.pod_logs(NS)
        result = box["result"]
        # CliRunner bypasses dfk8s.cli.main, which turns the error into one line and its exit code.
        assert isinstance(result.exception, SpecError), (result.output, cluster.pod_logs(NS))
        assert result.exception.exit_code == 42
        message = str(result.exception)
        assert "PodFailurePolicy" in message and "no such model on the Hub" in message
        # Exit 42 failed the Job at once: one pod, no retry.
        assert len(_job_pods(cluster, name)) == 1
    finally:
        _delete_job(cluster, name)


def test_should_read_the_list_from_a_pod_and_delete_the_job_when_list_pvc_is_called(
    kube_env, claim, repo, monkeypatch
):
    cluster = kube_env
    # Fill the claim's folder from this machine (`model pull --to`), as a pull Job would have.
    with FakeHub({MODEL: repo}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        filled = invoke("model", "pull", MODEL, "--to", claim.folder / "huggingface")
        assert filled.exit_code == 0, filled.output
    monkeypatch.delenv("HF_ENDPOINT")
    (here,) = list_cache(claim.folder / "huggingface")

    created: list[str] = []

    def list_job():
        names = [
            job.metadata.name
            for job in cluster.batch.list_namespaced_job(NS).items
            if job.metadata.name.startswith("dfk8s-model-list-")
        ]
        created.extend(n for n in names if n not in created)
        return created

    thread, box = _in_thread("model", "list", "--pvc", claim.name)
    (name,) = cluster.wait_for(list_job, what="the list job")
    thread.join(300)
    assert not thread.is_alive(), cluster.pod_logs(NS)
    result = box["result"]
    assert result.exit_code == 0, (result.output, cluster.pod_logs(NS))
    (row,) = [line for line in result.stdout.splitlines() if line.startswith(MODEL)]
    assert format_bytes(here.bytes) in row and "complete" in row and here.commit[:12] in row
    # The folder is the pod's view of the claim (mounted at /cache), not this machine's.
    assert row.split()[-1] == "/cache/" + str(Path(here.snapshot).relative_to(claim.folder))
    cluster.wait_for(lambda: cluster.job(NS, name) is None, what="the list job deleted")
