"""A FLUX run on the cluster: GPU pods from the GPU image, admitted with the fake plugin's GPUs, on the CPU.

`dfk8s submit --pipeline text2image` with the diffusers serving, as a user submits it: the worker pods ask
for ``nvidia.com/gpu`` (the profile's), the real scheduler and kubelet admit them with devices of the fake
device plugin (the one stand-in: there is no GPU here), and they run the GPU image (``dfk8s-gpu:dev``,
imported under the profile's tag) with its real entrypoint and user. The model is a tiny random FLUX
pipeline built in the test into a claim that the pods mount as their model cache (``--model-cache-pvc``),
read-only and offline, as a cache filled by ``dfk8s model pull`` would be.
"""

from __future__ import annotations

import base64
import io
import json
import os

from click.testing import CliRunner
from PIL import Image

from dfk8s.cli import cli
from dfk8s.kube.manifests import COMPILE_CACHE_FOLDER, RUN_AS_USER
from dfk8s.run import layout
from dfk8s.storage import open_storage
from dfk8s.testing.tiny_flux import build_tiny_flux
from tests.cluster.conftest import NS
from tests.cluster.node import NODE_NAME

ROWS = 3


def tiny_model_on(claim) -> None:
    """The tiny FLUX in the claim, readable by the pods' uid as a `dfk8s model pull --pvc` Job leaves it."""
    model = build_tiny_flux(claim.folder / "tiny-flux")
    # transformers writes weights 0600 (a temporary file, renamed), as root here: the pods' uid must
    # read them, as it reads what a `dfk8s model pull --pvc` Job (the same uid) wrote.
    for path in [model, *model.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def submit_flux(cluster, claim, manifest, output: str, run_id: str, *extra) -> None:
    result = CliRunner().invoke(cli, [str(a) for a in (
        "submit", "--pipeline", "text2image", "--input", manifest, "--output", output, "--run-id", run_id,
        "--s3-secret", "s3", "--service-account", "dfk8s-reducer",
        "--model", "/cache/tiny-flux", "--model-cache-pvc", claim.name,
        "--steps", "2", "--height", "64", "--width", "64", "--dtype", "float32", "--rows-per-shard", "2",
        "--wait", "--poll-seconds", "1", "--no-progress", *extra,
    )])
    assert result.exit_code == 0, result.output + cluster.pod_logs(NS)
    rows = sum(1 for line in manifest.read_text().splitlines() if line.strip())
    assert f"{rows} rows: {rows} ok" in result.stderr, result.stderr


def prompts(tmp_path, rows: int):
    manifest = tmp_path / "prompts.jsonl"
    manifest.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": f"a red fox {i}"}]})
                                + "\n" for i in range(rows)))
    return manifest


def test_a_flux_run_gets_gpus_and_runs_the_gpu_image(kube_env, gpu_image, claim, s3_bucket, tmp_path, run_id):
    cluster = kube_env
    tiny_model_on(claim)
    manifest = prompts(tmp_path, ROWS)
    allocated_before = cluster.node.log("fake-gpu", 1000).count("allocated ")
    output = f"s3://{s3_bucket}/runs"
    submit_flux(cluster, claim, manifest, output, run_id)

    # Each image is the tiny pipeline's: a 64x64 PNG, in the manifest's order.
    storage = open_storage(output).child(run_id)
    rows = [json.loads(line) for line in storage.open_lines(layout.RESULT_KEY)]
    assert [r["conversations"][0]["content"] for r in rows] == [f"a red fox {i}" for i in range(ROWS)]
    for row in rows:
        (ref,) = row["images"] if isinstance(row["images"], list) else [row["images"]]
        data = open_storage(ref.rsplit("/", 1)[0]).read_bytes(ref.rsplit("/", 1)[1]) if ref.startswith(
            "s3://") else base64.b64decode(ref)
        with Image.open(io.BytesIO(data)) as image:
            assert image.size == (64, 64)

    # The pods asked for a GPU each, from the GPU image, and the kubelet got one from the device plugin.
    pods = cluster.pods(NS, f"dfk8s.io/run={run_id},dfk8s.io/component=map")
    assert len(pods) == 2
    for pod in pods:
        (worker,) = pod["spec"]["containers"]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1" and worker["image"] == gpu_image
        assert pod["spec"]["nodeName"] == NODE_NAME and pod["status"]["phase"] == "Succeeded"
    assert cluster.node.log("fake-gpu", 1000).count("allocated ") - allocated_before == len(pods)


def test_flux_compiles_once_per_cluster_and_the_next_pod_starts_from_the_claims_cache(
        kube_env, gpu_image, claim, s3_bucket, tmp_path, run_id):
    """Issue 18: the first pod compiles and publishes into the claim; the next one loads and compiles nothing.

    --compile stands in for the default on a CUDA GPU (this node's GPUs are the fake plugin's: torch sees
    none, so the default would be off); the compiling is real, inductor's C++ on the CPU.
    """
    cluster = kube_env
    tiny_model_on(claim)
    # As `dfk8s model pull --pvc` leaves it: made by the pods' uid (tests/kube covers the pull's part).
    cache = claim.folder / COMPILE_CACHE_FOLDER
    cache.mkdir()
    os.chown(cache, RUN_AS_USER, RUN_AS_USER)
    manifest = prompts(tmp_path, 2)
    output = f"s3://{s3_bucket}/runs"
    summaries = []
    for run in (run_id, run_id + "b"):
        submit_flux(cluster, claim, manifest, output, run, "--compile")
        summaries.append(open_storage(output).child(run).read_json(layout.SUMMARY_KEY)["flux"])
    first, second = summaries
    assert first["workers_compiled"] == 1 and first["graphs_compiled"] > 0, first
    published = list(cache.glob("*.torchcache"))
    assert len(published) == 1 and published[0].stat().st_uid == RUN_AS_USER
    assert second.get("workers_from_cache") == 1 and "workers_compiled" not in second, second
    assert second["graphs_compiled"] == 0 and second["graphs_loaded"] > 0, second
    # The models stayed read-only to the pods: only the compile cache's folder was written.
    assert not [p for p in claim.folder.rglob("*") if p.stat().st_uid == RUN_AS_USER and cache not in
                (p, *p.parents)]

