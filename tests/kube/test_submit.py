"""`dfk8s submit --dry-run`: the Jobs it prints (checked with kubernetes-validate) and the plan.

Real submits, status, logs, list, cancel and the reduce Job run against a real control plane in
tests/cluster (make test-cluster).
"""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from dfk8s.cli import cli
from dfk8s.errors import RunNotFound, SpecError
from dfk8s.kube import SUPPORTED_KUBERNETES
from tests.conftest import DATAFLOW_ROOT, VQA_MANIFEST

kubernetes_validate = pytest.importorskip("kubernetes_validate")

NS = "batch"
SENTINELS = {
    "DF_API_KEY": "sk-SENTINEL-api-key",
    "AWS_SECRET_ACCESS_KEY": "SENTINEL-aws-secret",
    "HF_TOKEN": "hf_SENTINEL_token",
    "OPENAI_API_KEY": "sk-SENTINEL-openai",
}


@pytest.fixture(autouse=True)
def _cached_schemas(k8s_schema_cache):
    """Every test here validates objects: read each schema file once."""


@pytest.fixture(autouse=True)
def _repo_profiles(monkeypatch, tmp_path):
    monkeypatch.delenv("DFK8S_JOBS_DIR", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))  # never the machine's own


@pytest.fixture
def sentinels(monkeypatch):
    """Credentials in this shell that must never show up anywhere (S3 accepts any key)."""
    for name, value in SENTINELS.items():
        monkeypatch.setenv(name, value)
    return SENTINELS


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def caption_args(output, *extra):
    return [
        "submit",
        "--pipeline",
        "caption",
        "--input",
        VQA_MANIFEST,
        "--image-root",
        DATAFLOW_ROOT,
        "--output",
        output,
        "--api-key-secret",
        "api/DF_API_KEY",
        "--s3-secret",
        "s3",
        "--service-account",
        "dfk8s-reducer",
        *extra,
    ]


def validate(obj):
    for version in SUPPORTED_KUBERNETES:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(
                f"{obj['metadata']['name']} invalid for {version} at "
                f"{'.'.join(map(str, exc.path))}: {exc.message}"
            ) from None


def objects_in(bucket_prefix, seaweed):
    bucket, prefix = bucket_prefix.split("/", 1)
    listed = seaweed.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for item in listed.get("Contents", [])]


def pod_spec(job):
    return job["spec"]["template"]["spec"]


# ----- dry run ----------------------------------------------------------------------------------


def test_dry_run_prints_only_valid_jobs_and_writes_nothing(s3_bucket, seaweed, sentinels):
    output = f"s3://{s3_bucket}/runs"
    result = invoke(
        *caption_args(
            output,
            "--dry-run",
            "--namespace",
            NS,
            "--run-id",
            "dry1",
            "--shards",
            "4",
            "--parallelism",
            "3",
            "--max-concurrency",
            "8",
            "--rpm",
            "120",
            "--api-url",
            "http://fake-api.batch.svc:8000/v1",
        )
    )
    assert result.exit_code == 0, result.output
    documents = list(yaml.safe_load_all(result.stdout))
    assert [d["kind"] for d in documents] == ["Job", "Job"]
    for job in documents:
        validate(job)
        assert job["metadata"]["labels"]["dfk8s.io/run"] == "dry1"
        assert job["metadata"]["namespace"] == NS
        assert pod_spec(job)["securityContext"]["runAsNonRoot"] is True
        security = pod_spec(job)["containers"][0]["securityContext"]
        assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
        assert security["capabilities"] == {"drop": ["ALL"]}
    map_job, reduce_job = documents
    spec = map_job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == 4 and spec["parallelism"] == 3
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    assert rules[1]["action"] == "FailIndex" and rules[1]["onExitCodes"]["values"] == [42]
    worker = pod_spec(map_job)["containers"][0]
    assert worker["command"] == ["dfk8s", "worker", "--run", f"{output}/dry1"]
    assert "nvidia.com/gpu" not in json.dumps(worker["resources"])
    assert "tolerations" not in pod_spec(map_job) and "nodeSelector" not in pod_spec(map_job)
    env = {e["name"]: e for e in worker["env"]}
    assert env["DF_API_KEY"] == {
        "name": "DF_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "api", "key": "DF_API_KEY"}},
    }
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    assert env["AWS_ENDPOINT_URL"]["value"] == s3_env_endpoint(seaweed)
    assert reduce_job["spec"]["template"]["spec"]["serviceAccountName"] == "dfk8s-reducer"
    assert reduce_job["spec"]["template"]["spec"]["containers"][0]["command"][-4:] == [
        "--wait-job",
        "dfk8s-dry1-map",
        "--namespace",
        NS,
    ]
    # The plan on stderr: rows, shards, pods, requests and the time estimate (bound by --rpm here:
    # 3 pods x 8 in flight x 60 / 3 s = 480/min > 120).
    err = result.stderr
    assert (
        "rows: 8 (4 with problems" in err and "shards: 4 of up to 2 rows" in err and "pods: 3 at once" in err
    )
    assert "requests: 4" in err and "rate: 120/min" in err and "bound by rpm" in err and "time: ~2 s" in err
    for value in sentinels.values():
        assert value not in result.stdout and value not in result.stderr
    assert objects_in(s3_bucket, seaweed) == []


def s3_env_endpoint(seaweed):
    return seaweed.endpoint


def test_dry_run_gpu_profile_for_text2image_diffusers(tmp_path, s3_bucket, seaweed, sentinels):
    manifest = tmp_path / "prompts.jsonl"
    manifest.write_text("".join(json.dumps({"prompt": f"a cat {i}"}) + "\n" for i in range(5)))
    base = [
        "submit",
        "--input-key",
        "prompt",
        "--pipeline",
        "text2image",
        "--input",
        manifest,
        "--output",
        f"s3://{s3_bucket}/runs",
        "--namespace",
        NS,
        "--run-id",
        "gpu1",
        "--rows-per-shard",
        "2",
        "--hf-token-secret",
        "hf:HF_TOKEN",
        "--dry-run",
    ]
    result = invoke(*base, "--queue", "team-a")
    assert result.exit_code == 0, result.output
    map_job, reduce_job = yaml.safe_load_all(result.stdout)
    validate(map_job)
    validate(reduce_job)
    assert map_job["spec"]["completions"] == 3 and map_job["spec"]["suspend"] is True
    assert map_job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    worker = pod_spec(map_job)["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod_spec(map_job)["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod_spec(map_job)["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {v["name"] for v in pod_spec(map_job)["volumes"]} >= {"dshm", "model-cache"}
    env = {e["name"]: e for e in worker["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "HF_TOKEN"}
    assert "nvidia.com/gpu" not in json.dumps(reduce_job)
    # The reducer needs no GPU image (multi-GB pull): it runs the CPU image of the same version.
    assert pod_spec(map_job)["containers"][0]["image"].startswith("ghcr.io/dfk8s/dfk8s-gpu:")
    assert pod_spec(reduce_job)["containers"][0]["image"].startswith("ghcr.io/dfk8s/dfk8s-cpu:")
    assert "requests:" not in result.stderr  # no time guess for GPU runs
    assert "warning: pods get no S3 credentials" in result.stderr
    # Flags replace the profile's scheduling.
    result = invoke(
        *base, "--gpus", "2", "--node-selector", "pool=h100", "--toleration", "dedicated=gpu:NoSchedule"
    )
    map_job, _ = yaml.safe_load_all(result.stdout)
    validate(map_job)
    assert pod_spec(map_job)["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pod_spec(map_job)["nodeSelector"] == {"pool": "h100"}
    assert pod_spec(map_job)["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}
    ]
    for value in sentinels.values():
        assert value not in result.stdout and value not in result.stderr
    assert objects_in(s3_bucket, seaweed) == []


def test_pods_get_the_cluster_s3_endpoint_when_it_differs_from_the_local_one(s3_bucket, seaweed, sentinels):
    result = invoke(*caption_args(f"s3://{s3_bucket}/runs", "--dry-run", "--s3-endpoint", seaweed.endpoint,
                                  "--cluster-s3-endpoint", "http://dfk8s-seaweedfs.batch:8333"))
    assert result.exit_code == 0, result.output
    for job in yaml.safe_load_all(result.stdout):
        env = {e["name"]: e.get("value") for e in pod_spec(job)["containers"][0]["env"]}
        assert env["AWS_ENDPOINT_URL"] == "http://dfk8s-seaweedfs.batch:8333"


def test_dry_run_refuses_an_api_serving_without_a_secret_reference(s3_bucket, sentinels):
    args = caption_args(f"s3://{s3_bucket}/runs", "--dry-run")
    args.remove("--api-key-secret")
    args.remove("api/DF_API_KEY")
    result = invoke(*args)
    assert isinstance(result.exception, SpecError)
    message = str(result.exception)
    assert "$DF_API_KEY stays on this machine" in message and "--api-key-secret" in message
    assert sentinels["DF_API_KEY"] not in message and result.stdout == ""


def test_submit_needs_s3_output_and_secret_references_not_values(tmp_path):
    result = invoke(*caption_args(str(tmp_path), "--dry-run"))
    assert isinstance(result.exception, SpecError) and "s3://" in str(result.exception)
    result = invoke(
        "submit",
        "--pipeline",
        "caption",
        "--input",
        VQA_MANIFEST,
        "--output",
        "s3://b/r",
        "--api-key-secret",
        "sk-live-1234",
        "--dry-run",
    )
    assert isinstance(result.exception, SpecError) and "sk-live-1234" not in str(result.exception)


def _planned_on_s3(bucket: str, run_id: str, options: dict) -> str:
    """Plan a caption run of the VQA fixture for Kubernetes under s3://BUCKET/runs; returns that output."""
    from dfk8s.plan.launch import RunRequest, prepare_run

    output = f"s3://{bucket}/runs"
    prepare_run(RunRequest(pipeline="caption", output=output, input=str(VQA_MANIFEST),
                           image_root=str(DATAFLOW_ROOT), run_id=run_id, options=options),
                stage_images=True, executor="kubernetes")
    return output


def test_a_resume_through_submit_needs_no_pipeline_and_refuses_a_changed_flag(s3_bucket, seaweed, sentinels):
    """run.json knows the pipeline, as for `dfk8s run`; a flag that differs from it is refused in one line
    that points at `dfk8s retry` (before, submit dropped the changed --model without a word)."""
    output = _planned_on_s3(s3_bucket, "planned", {"model": "gpt-5-nano"})
    secrets = ["--api-key-secret", "api/DF_API_KEY", "--namespace", NS, "--dry-run"]
    plain = invoke("submit", "--run-id", "planned", "--output", output, *secrets)
    assert plain.exit_code == 0, plain.output
    assert [d["kind"] for d in yaml.safe_load_all(plain.stdout)] == ["Job", "Job"]
    changed = invoke("submit", "--run-id", "planned", "--output", output, "--model", "gpt-4o", *secrets)
    assert isinstance(changed.exception, SpecError), changed.output
    message = str(changed.exception)
    assert "\n" not in message and "--model gpt-4o differs from run planned's gpt-5-nano" in message
    assert "dfk8s retry planned" in message
    same = invoke("submit", "--run-id", "planned", "--output", output, "--model", "gpt-5-nano", *secrets)
    assert same.exit_code == 0, same.output
    new = invoke("submit", "--run-id", "nope", "--output", output, *secrets)
    assert isinstance(new.exception, RunNotFound) and new.exception.exit_code == 2  # bad flags: exit 2
    assert "--pipeline is required to start a new run" in str(new.exception)
    assert f"no run nope under {output}" in str(new.exception)


def test_a_resume_through_submit_sizes_its_pods_from_run_json(s3_bucket, seaweed, sentinels):
    """A batch-mode run resumed with no --api-mode still gets the profile's small batch pod."""
    output = _planned_on_s3(s3_bucket, "batched", {"model": "gpt-4o", "api_mode": "batch"})
    secrets = ["--api-key-secret", "api/DF_API_KEY", "--namespace", NS]
    resumed = invoke("submit", "--run-id", "batched", "--output", output, *secrets, "--dry-run")
    assert resumed.exit_code == 0, resumed.output
    worker = pod_spec(next(yaml.safe_load_all(resumed.stdout)))["containers"][0]
    assert worker["resources"]["requests"]["cpu"] == "100m"
