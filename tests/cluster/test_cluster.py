"""The chart, Pod Security, scheduling and the dry-run YAML, against the real API server and scheduler."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from dfk8s.cli import cli
from dfk8s.kube import SUPPORTED_KUBERNETES, is_supported
from tests.cluster.conftest import CHART_DIR, CREDENTIALS, NS
from tests.cluster.node import GPUS, NODE_NAME
from tests.conftest import DATAFLOW_ROOT, VQA_MANIFEST


def _prompt_row(text: str) -> str:
    return json.dumps({"conversations": [{"role": "user", "content": text}]})


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_the_server_reports_a_supported_pinned_version(cluster):
    from kubernetes import client

    version = client.VersionApi(cluster.api).get_code().git_version
    assert version == cluster.version  # the ldflags of hack/cluster/build.sh
    assert is_supported(version)
    assert cluster.version.lstrip("v").rsplit(".", 1)[0] in SUPPORTED_KUBERNETES


def test_helm_installs_every_object_of_the_chart(cluster, tmp_path):
    namespace = cluster.create_namespace("chart-all")
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "seaweedfs": {"enabled": True},
                "fakeApi": {"enabled": True},
                "secret": {
                    "create": True,
                    "apiKey": "sk-x",
                    "awsAccessKeyId": "id",
                    "awsSecretAccessKey": "key",
                    "hfToken": "hf",
                },
            }
        )
    )
    installed = cluster.helm("install", "all", str(CHART_DIR), "-n", namespace, "-f", str(values))
    assert "STATUS: deployed" in installed.stdout
    manifest = cluster.helm("get", "manifest", "all", "-n", namespace).stdout
    objects = [doc for doc in yaml.safe_load_all(manifest) if doc]
    kinds = {obj["kind"] for obj in objects}
    assert {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Secret", "Deployment", "Service"} <= kinds
    for obj in objects:  # every object is in the API server, as helm sent it
        got = cluster.kubectl("get", obj["kind"], obj["metadata"]["name"], "-n", namespace, "-o", "json")
        assert got.returncode == 0, got.stderr
        assert json.loads(got.stdout)["metadata"]["labels"]["app.kubernetes.io/instance"] == "all"
    assert cluster.helm("uninstall", "all", "-n", namespace).returncode == 0


def test_the_restricted_namespace_refuses_a_pod_that_is_not_restricted(kube_env):
    cluster = kube_env
    labels = cluster.core.read_namespace(NS).metadata.labels
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "root-pod"},
        "spec": {
            "containers": [
                {"name": "c", "image": "x", "command": ["true"]}  # root, capabilities kept
            ]
        },
    }
    result = cluster.kubectl("apply", "-n", NS, "--dry-run=server", "-f", "-", input=json.dumps(pod))
    assert result.returncode != 0 and "violates PodSecurity" in result.stderr


def _dry_run(s3_bucket, *extra):
    result = invoke("submit", *extra, "--output", f"s3://{s3_bucket}/runs", "--namespace", NS, "--dry-run")
    assert result.exit_code == 0, result.output
    return result.stdout


def test_dry_run_yaml_is_accepted_by_the_api_server(kube_env, s3_bucket, run_id):
    """kubectl apply --dry-run=server: defaulting, validation, admission (PodSecurity) of the real server."""
    cluster = kube_env
    text = _dry_run(
        s3_bucket,
        "--pipeline",
        "caption",
        "--input",
        VQA_MANIFEST,
        "--image-root",
        DATAFLOW_ROOT,
        *CREDENTIALS,
        "--run-id",
        run_id,
        "--shards",
        "4",
    )
    result = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=text)
    assert result.returncode == 0, result.stderr
    assert f"job.batch/dfk8s-{run_id}-map created (server dry run)" in result.stdout
    assert f"job.batch/dfk8s-{run_id}-reduce created (server dry run)" in result.stdout
    assert "Warning" not in result.stderr, result.stderr  # no PodSecurity or deprecation warnings


def _gpu_pods(cluster, run_id):
    return cluster.pods(NS, f"dfk8s.io/run={run_id},dfk8s.io/component=map")


@pytest.mark.parametrize("gpus", [None, "0"])
def test_flux_pods_are_given_the_nodes_gpus(kube_env, held, s3_bucket, tmp_path, run_id, gpus):
    """The text2image/diffusers objects as submit builds them, created for real: the scheduler places
    the worker pods on the node whose GPUs (the fake device plugin's) they ask for, one each, through
    the GPU node selector and toleration; with --gpus 0 they ask for none."""
    cluster = kube_env
    manifest = tmp_path / "prompts.jsonl"
    manifest.write_text("".join(_prompt_row(f"a cat {i}") + "\n" for i in range(3)))
    extra = ["--gpus", gpus] if gpus else []
    text = _dry_run(
        s3_bucket,
        "--pipeline",
        "text2image",
        "--input",
        manifest,
        "--rows-per-shard",
        "1",
        "--run-id",
        run_id,
        "--parallelism",
        "3",
        "--service-account",
        "dfk8s-reducer",
        "--image",
        held.image("flux"),  # placement only: the pods never start
        *extra,
    )
    map_job = next(doc for doc in yaml.safe_load_all(text) if doc["metadata"]["name"].endswith("-map"))
    created = cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(map_job))
    assert created.returncode == 0, created.stderr
    try:
        pods = cluster.wait_for(
            lambda: (lambda p: p if len(p) == 3 and all(x["spec"].get("nodeName") for x in p) else None)(
                _gpu_pods(cluster, run_id)
            ),
            what="3 scheduled pods",
        )
        assert {pod["spec"]["nodeName"] for pod in pods} == {NODE_NAME}
        limits = pods[0]["spec"]["containers"][0]["resources"]["limits"]
        selector = pods[0]["spec"].get("nodeSelector") or {}
        if gpus is None:
            assert limits["nvidia.com/gpu"] == "1" and selector == {"nvidia.com/gpu.present": "true"}
            allocatable = cluster.core.read_node(NODE_NAME).status.allocatable
            assert allocatable["nvidia.com/gpu"] == str(GPUS)  # the fake device plugin's, registered
        else:
            assert "nvidia.com/gpu" not in limits and "nvidia.com/gpu.present" not in selector
    finally:
        cluster.batch.delete_namespaced_job(map_job["metadata"]["name"], NS, propagation_policy="Background")


def test_a_gpu_pod_beyond_the_gpu_capacity_stays_pending(kube_env, held, s3_bucket, tmp_path, run_id):
    cluster = kube_env
    manifest = tmp_path / "prompts.jsonl"
    manifest.write_text(_prompt_row("a cat") + "\n")
    text = _dry_run(
        s3_bucket,
        "--pipeline",
        "text2image",
        "--input",
        manifest,
        "--run-id",
        run_id,
        "--gpus",
        str(GPUS + 1),
        "--service-account",
        "dfk8s-reducer",
    )
    map_job = next(doc for doc in yaml.safe_load_all(text) if doc["metadata"]["name"].endswith("-map"))
    created = cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(map_job))
    assert created.returncode == 0, created.stderr
    try:

        def unschedulable():
            pods = _gpu_pods(cluster, run_id)
            conditions = pods[0].get("status", {}).get("conditions", []) if pods else []
            return next(
                (c for c in conditions if c["type"] == "PodScheduled" and c["status"] == "False"), None
            )

        condition = cluster.wait_for(unschedulable, what="the scheduler to give up on the pod")
        assert condition["reason"] == "Unschedulable" and "nvidia.com/gpu" in condition["message"]
    finally:
        cluster.batch.delete_namespaced_job(map_job["metadata"]["name"], NS, propagation_policy="Background")


def test_model_cache_objects_are_accepted_by_the_api_server(kube_env, s3_bucket, tmp_path, run_id):
    """Issue 13's objects on the real server: a FLUX submit with --model-cache-pvc (read-only models, offline
    env, a writable compile cache) and the model pull Job (write mount), through defaulting, validation and
    PodSecurity restricted."""
    cluster = kube_env
    manifest = tmp_path / "prompts.jsonl"
    manifest.write_text("".join(_prompt_row(f"a cat {i}") + "\n" for i in range(2)))
    submit_yaml = _dry_run(
        s3_bucket,
        "--pipeline",
        "text2image",
        "--input",
        manifest,
        "--run-id",
        run_id,
        "--service-account",
        "dfk8s-reducer",
        "--model-cache-pvc",
        "hf-cache",
    )
    map_job = next(doc for doc in yaml.safe_load_all(submit_yaml) if doc["metadata"]["name"].endswith("-map"))
    pod = map_job["spec"]["template"]["spec"]
    claims = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    # One volume for the claim: the models mounted read-only, FLUX's compile cache writable (issue 18).
    assert [c["persistentVolumeClaim"] for c in claims] == [{"claimName": "hf-cache"}]
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]
              if m["name"] == claims[0]["name"]}
    assert mounts["/cache"]["readOnly"] is True and mounts["/compile-cache"]["subPath"] == "dfk8s-compile"
    pull = invoke("model", "pull", "black-forest-labs/FLUX.1-dev", "--pvc", "hf-cache", "-n", NS,
                  "--hf-token-secret", "hf/HF_TOKEN", "--dry-run")
    assert pull.exit_code == 0, pull.output
    for text, kind in ((submit_yaml, "submit"), (pull.stdout, "model pull")):
        result = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=text)
        assert result.returncode == 0, (kind, result.stderr)
        assert "created (server dry run)" in result.stdout, (kind, result.stdout)
        assert "Warning" not in result.stderr, (kind, result.stderr)  # no PodSecurity warnings


@pytest.mark.parametrize("serving", ["vllm", "transformers"])
def test_self_hosted_engine_sidecar_pods_are_admitted(kube_env, s3_bucket, run_id, serving):
    """submit --serving vllm / transformers: the map Job's pod, with the engine as a native sidecar, passes
    the real server's validation and PodSecurity restricted (as a Job and as the Pod it makes)."""
    cluster = kube_env
    text = _dry_run(s3_bucket, "--pipeline", "caption", "--input", VQA_MANIFEST, "--image-root",
                    DATAFLOW_ROOT, "--s3-secret", "s3", "--service-account", "dfk8s-reducer",
                    "--serving", serving, "--model", "Qwen/Qwen2.5-VL-3B-Instruct", "--run-id", run_id,
                    "--shards", "2")
    result = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=text)
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr
    job = next(obj for obj in yaml.safe_load_all(text) if obj and obj["metadata"]["name"].endswith("-map"))
    (engine,) = job["spec"]["template"]["spec"]["initContainers"]
    assert engine["restartPolicy"] == "Always" and "/health" in engine["startupProbe"]["exec"]["command"][2]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{run_id}-sidecar"},
           "spec": job["spec"]["template"]["spec"]}
    result = cluster.kubectl("apply", "-n", NS, "--dry-run=server", "-f", "-", input=json.dumps(pod))
    assert result.returncode == 0 and "Warning" not in result.stderr, result.stderr
