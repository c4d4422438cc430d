"""Captioning with a self-hosted engine as a native sidecar, on the real kubelet.

`dfk8s submit --serving transformers`: each map pod runs `transformers serve` (from the GPU image, which has
transformers' serving extra) as an init container with ``restartPolicy: Always`` and a startup probe; the
worker (the CPU image) starts once the probe passes and sends the rows to it on localhost. The model is the
tiny random Qwen2-VL (dfk8s/testing/tiny_vlm.py), in a claim mounted read-only as the model cache, loaded
offline. When the worker exits, the kubelet stops the sidecar and the pod, then the Job, completes.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dfk8s.cli import cli
from dfk8s.run import layout
from dfk8s.storage import open_storage
from dfk8s.testing.tiny_vlm import build_tiny_vlm
from tests.cluster.conftest import NS
from tests.conftest import DATAFLOW_ROOT, VQA_MANIFEST


def _started_at(status: dict) -> str:
    return (status.get("state", {}).get("terminated") or {}).get("startedAt", "")


@pytest.mark.timeout(1200)  # the GPU image's import (~3 min), then torch and transformers load in each pod
def test_a_caption_run_with_the_engine_as_a_native_sidecar_completes(kube_env, gpu_image, claim, s3_bucket,
                                                                      run_id):
    cluster = kube_env
    model = build_tiny_vlm(claim.folder / "tiny-vlm")
    for path in [model, *model.rglob("*")]:  # transformers writes weights 0600; the pods' uid reads them
        path.chmod(0o755 if path.is_dir() else 0o644)
    output = f"s3://{s3_bucket}/runs"
    result = CliRunner().invoke(cli, [str(a) for a in (
        "submit", "--pipeline", "caption", "--serving", "transformers", "--input", VQA_MANIFEST,
        "--image-root", DATAFLOW_ROOT, "--output", output, "--run-id", run_id,
        "--s3-secret", "s3", "--service-account", "dfk8s-reducer",
        "--model", "/cache/tiny-vlm", "--model-cache-pvc", claim.name, "--max-tokens", "8", "--shards", "2",
    )])
    assert result.exit_code == 0, result.output

    def reduced():
        job = cluster.job(NS, f"dfk8s-{run_id}-reduce") or {}
        status = job.get("status") or {}
        if status.get("failed"):
            raise AssertionError(f"the reducer failed: {status}\n{cluster.pod_logs(NS)}")
        return status.get("succeeded")

    try:
        cluster.wait_for(reduced, what="the run to be reduced", timeout=480, interval=2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{cluster.pod_logs(NS)}") from None

    storage = open_storage(output).child(run_id)
    rows = [json.loads(line) for line in storage.open_lines(layout.RESULT_KEY)]
    good = [r for r in rows if "error" not in r]
    assert len(rows) == 8 and len(good) == 4 and all(r["caption"].strip() for r in good)

    pods = cluster.pods(NS, f"dfk8s.io/run={run_id},dfk8s.io/component=map")
    assert len(pods) == 2
    for pod in pods:
        (engine,) = pod["spec"]["initContainers"]
        assert engine["restartPolicy"] == "Always" and engine["image"] == gpu_image
        assert pod["status"]["phase"] == "Succeeded"
        # The engine started first; the worker only after its startup probe passed; once the worker ended
        # the kubelet stopped the engine.
        (engine_status,) = pod["status"]["initContainerStatuses"]
        (worker_status,) = pod["status"]["containerStatuses"]
        assert engine_status["state"].get("terminated"), engine_status
        assert _started_at(engine_status) <= _started_at(worker_status)
        worker_ended = worker_status["state"]["terminated"]["finishedAt"]
        assert engine_status["state"]["terminated"]["finishedAt"] >= worker_ended
