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

from click.testing import CliRunner
from PIL import Image

from dfk8s.cli import cli
from dfk8s.run import layout
from dfk8s.storage import open_storage
from dfk8s.testing.tiny_flux import build_tiny_flux
from tests.cluster.conftest import NS
from tests.cluster.node import NODE_NAME

ROWS = 3


def test_a_flux_run_gets_gpus_and_runs_the_gpu_image(kube_env, gpu_image, claim, s3_bucket, tmp_path, run_id):
    cluster = kube_env
    model = build_tiny_flux(claim.folder / "tiny-flux")
    # transformers writes weights 0600 (a temporary file, renamed), as root here: the pods' uid must
    # read them, as it reads what a `dfk8s model pull --pvc` Job (the same uid) wrote.
    for path in [model, *model.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    manifest = tmp_path / "prompts.jsonl"
    manifest.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": f"a red fox {i}"}]})
                                + "\n" for i in range(ROWS)))
    allocated_before = cluster.node.log("fake-gpu", 1000).count("allocated ")
    output = f"s3://{s3_bucket}/runs"
    result = CliRunner().invoke(cli, [str(a) for a in (
        "submit", "--pipeline", "text2image", "--input", manifest, "--output", output, "--run-id", run_id,
        "--s3-secret", "s3", "--service-account", "dfk8s-reducer",
        "--model", "/cache/tiny-flux", "--model-cache-pvc", claim.name,
        "--steps", "2", "--height", "64", "--width", "64", "--dtype", "float32", "--rows-per-shard", "2",
        "--wait", "--poll-seconds", "1", "--no-progress",
    )])
    assert result.exit_code == 0, result.output + cluster.pod_logs(NS)
    assert f"{ROWS} rows: {ROWS} ok" in result.stderr, result.stderr

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
