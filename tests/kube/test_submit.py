"""`dfk8s submit / status / logs / list / cancel` and `reduce --wait-job`.

Dry runs are checked with kubernetes-validate; real submits go through the official `kubernetes`
client to the fake API server (dfk8s.testing.fake_kube), which runs the pods as local processes
against SeaweedFS and the fake OpenAI server.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
import yaml
from click.testing import CliRunner

from dfk8s import layout
from dfk8s.cli import cli
from dfk8s.errors import KubernetesError, SpecError
from dfk8s.kube import SUPPORTED_KUBERNETES
from dfk8s.storage import open_storage
from dfk8s.testing.fake_kube import FakeKube
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


@pytest.fixture
def cluster(tmp_path, monkeypatch, s3_env, fake_api):
    """The fake API server running pods, its kubeconfig in $KUBECONFIG, and the run's Secrets."""
    with FakeKube(run_pods=True, watch_timeout=1.0) as fake:
        monkeypatch.setenv("KUBECONFIG", fake.write_kubeconfig(tmp_path / "kubeconfig", namespace=NS))
        fake.create_secret(NS, "api", {"DF_API_KEY": "test-key-not-secret"})
        fake.create_secret(
            NS, "s3", {"AWS_ACCESS_KEY_ID": s3_env.access_key, "AWS_SECRET_ACCESS_KEY": s3_env.secret_key}
        )
        yield fake


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


# ----- through the cluster API ------------------------------------------------------------------


def test_submit_wait_status_logs_list_cancel(cluster, s3_bucket, fake_api, api_key, tmp_path):
    output = f"s3://{s3_bucket}/runs"
    result = invoke(
        *caption_args(
            output,
            "--run-id",
            "e2e1",
            "--shards",
            "2",
            "--parallelism",
            "2",
            "--api-url",
            fake_api.url + "/v1",
            "--model",
            "gpt-5-nano",
            "--max-concurrency",
            "4",
            "--wait",
            "--poll-seconds",
            "0.2",
        )
    )
    assert result.exit_code == 0, result.output + "".join(
        cluster.pod_log(NS, p["metadata"]["name"]) for p in cluster.list("pods", NS)
    )
    assert result.stdout.splitlines()[0] == "e2e1"
    assert "created jobs dfk8s-e2e1-map, dfk8s-e2e1-reduce in namespace batch" in result.stderr
    assert "dfk8s status e2e1 -n batch" in result.stderr and "8 rows: 4 ok, 4 failed" in result.stderr
    storage = open_storage(output).child("e2e1")
    rows = [json.loads(line) for line in storage.open_lines(layout.RESULT_KEY)]
    assert [r["conversation"] for r in rows] == [
        r["conversation"] for r in json.loads(VQA_MANIFEST.read_text())
    ]
    assert sum("caption" in r for r in rows) == 4
    assert any(key.startswith("staged/") for key in storage.list("staged"))  # local images went to S3

    status = invoke("status", "e2e1")
    assert status.exit_code == 0, status.output
    assert "in namespace batch: complete" in status.stdout and "2/2 indexes completed (0-1)" in status.stdout
    assert "8/8 rows (4 ok, 4 failed); 2/2 shards done" in status.stdout
    assert f"result: {output}/e2e1/result.jsonl" in status.stdout
    as_json = json.loads(invoke("status", "e2e1", "--json").stdout)
    assert as_json["state"] == "complete" and as_json["map_job"]["completed"] == [0, 1]

    logs = invoke("logs", "e2e1", "--index", "1")
    assert logs.exit_code == 0 and "shard 1: 2 ok, 2 failed" in logs.stdout
    assert "job dfk8s-e2e1-map: Complete" in invoke("logs", "e2e1", "--reducer").stdout
    assert invoke("logs", "e2e1").stdout.count("==> dfk8s-e2e1-map-") == 2
    followed = invoke("logs", "e2e1", "--index", "0", "--follow", "--tail", "1")
    assert followed.exit_code == 0 and followed.stdout == "shard 0: 2 ok, 2 failed\n"
    assert "--follow streams one pod" in invoke("logs", "e2e1", "--follow").output
    listing = invoke("list").stdout.splitlines()
    assert listing[0].split() == ["RUN", "PIPELINE", "STATE", "SHARDS", "FAILED", "CREATED"]
    assert listing[1].split()[:5] == ["e2e1", "caption", "complete", "2/2", "-"]

    everything = (
        result.output
        + status.output
        + logs.output
        + json.dumps(cluster.list("jobs", NS))
        + storage.read_bytes(layout.RUN_SPEC_KEY).decode()
    )
    assert (
        api_key not in everything
        and cluster.list("jobs", NS)[0]["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    )

    again = invoke(*caption_args(output, "--run-id", "e2e1"))
    assert isinstance(again.exception, KubernetesError) and "already exists" in str(again.exception)
    cancelled = invoke("cancel", "e2e1")
    assert cancelled.exit_code == 0 and "deleted jobs dfk8s-e2e1-map, dfk8s-e2e1-reduce" in cancelled.stderr
    assert f"its data stays at {output}/e2e1" in cancelled.stderr
    assert cluster.list("jobs", NS) == [] and cluster.list("pods", NS) == []
    assert storage.exists(layout.RESULT_KEY) and storage.exists(layout.SUMMARY_KEY)
    gone = invoke("status", "e2e1")
    assert isinstance(gone.exception, KubernetesError) and "run not found" in str(gone.exception)
    from_storage = invoke("status", "e2e1", "--output", output).stdout  # the run's data still knows it
    assert "in namespace batch: complete" in from_storage and "map job: none" in from_storage


def test_failed_index_and_evicted_pod_are_reduced_and_reported(cluster, s3_bucket, fake_api, api_key):
    output = f"s3://{s3_bucket}/runs"
    cluster.inject(NS, "dfk8s-fail1-map", 1, 42)  # FailIndex: the shard is failed, not retried
    cluster.inject(NS, "dfk8s-fail1-map", 2, "evict")  # DisruptionTarget: retried, not counted
    result = invoke(
        *caption_args(
            output,
            "--run-id",
            "fail1",
            "--shards",
            "4",
            "--parallelism",
            "2",
            "--api-url",
            fake_api.url + "/v1",
            "--wait",
            "--poll-seconds",
            "0.2",
        )
    )
    assert result.exit_code == 1, result.output
    assert "not processed (shards [1])" in result.stderr and "did not complete: partial" in result.stderr
    summary = open_storage(output).child("fail1").read_json(layout.SUMMARY_KEY)
    assert (
        summary["failed_shards"] == [1] and summary["finished_shards"] == 3 and summary["not_processed"] == 2
    )
    errors = [json.loads(line) for line in open_storage(output).child("fail1").open_lines(layout.ERRORS_KEY)]
    assert any("shard 1: its shard failed" in e["error"]["message"] for e in errors)
    job = cluster.get("jobs", NS, "dfk8s-fail1-map")["status"]
    assert job["completedIndexes"] == "0,2-3" and job["failedIndexes"] == "1" and job["failed"] == 1
    index2 = cluster.list("pods", NS, "batch.kubernetes.io/job-completion-index=2")
    assert sorted(p["status"]["phase"] for p in index2) == ["Failed", "Succeeded"]
    status = invoke("status", "fail1").stdout
    assert "partial" in status and "failed indexes 1" in status and "failed shards: 1" in status
    # Cancel, fix the cause, submit the same run id: only shard 1 is processed again.
    assert invoke("cancel", "fail1").exit_code == 0
    requests_before = len(fake_api.requests())
    resumed = invoke(
        *caption_args(output, "--run-id", "fail1", "--parallelism", "2", "--wait", "--poll-seconds", "0.2")
    )
    assert resumed.exit_code == 0, resumed.output
    assert "run fail1: resumed 8 rows in 4 shards" in resumed.stderr
    assert len(fake_api.requests()) - requests_before == 1  # shard 1 holds one good row
    summary = open_storage(output).child("fail1").read_json(layout.SUMMARY_KEY)
    assert summary["complete"] and summary["failed_shards"] == [] and summary["ok"] == 4


def test_map_job_failed_with_some_indexes_done_is_still_reduced(
    tmp_path, monkeypatch, s3_env, s3_bucket, fake_api, api_key
):
    """The Job ends Failed (deadline) after one shard; the reducer (waiting through watch timeouts and
    a compacted history) assembles what exists and names the rest."""
    from dfk8s.worker import process_shard

    with FakeKube(watch_timeout=0.3) as fake:
        monkeypatch.setenv("KUBECONFIG", fake.write_kubeconfig(tmp_path / "kubeconfig", namespace=NS))
        output = f"s3://{s3_bucket}/runs"
        result = invoke(
            *caption_args(output, "--run-id", "dl1", "--shards", "3", "--api-url", fake_api.url + "/v1")
        )
        assert result.exit_code == 0, result.output
        storage = open_storage(output).child("dl1")
        # The reducer runs as its pod would: its own process, the cluster through $KUBECONFIG.
        reducer = subprocess.Popen(
            [sys.executable, "-m", "dfk8s", "reduce", storage.url(), "--wait-job", "dfk8s-dl1-map", "-n", NS],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        process_shard(storage, 0)
        fake.finish_pod(NS, "dfk8s-dl1-map", 0, 0)
        fake.start_pod(NS, "dfk8s-dl1-map", 1)
        fake.wait_for(lambda: any("watch=" in path for _, path in fake.requests), what="the reducer's watch")
        fake.compact()
        time.sleep(0.5)  # the reducer's watch times out and meets the compacted history
        fake.end_job(NS, "dfk8s-dl1-map")
        out, err = reducer.communicate(timeout=60)
        assert reducer.returncode == 0, out + err
        assert (
            "job dfk8s-dl1-map: Failed (DeadlineExceeded); failed shards" not in err
        )  # none failed by index
        assert "job dfk8s-dl1-map: Failed (DeadlineExceeded)" in err
        assert sum(1 for _, path in fake.requests if "watch=" in path) >= 2, "the reducer did not watch again"
        summary = storage.read_json(layout.SUMMARY_KEY)
        assert summary["finished_shards"] == 1 and summary["failed_shards"] == [1, 2]
        assert len(list(storage.open_lines(layout.RESULT_KEY))) == 8
        status = invoke("status", "dl1").stdout
        assert "map job: dfk8s-dl1-map: Failed (DeadlineExceeded), 1/3 indexes completed (0)" in status
        assert "failed shards: 1-2" in status


def test_reduce_stops_when_the_map_job_is_deleted(tmp_path, monkeypatch, s3_env, s3_bucket):
    with FakeKube(watch_timeout=5) as fake:
        monkeypatch.setenv("KUBECONFIG", fake.write_kubeconfig(tmp_path / "kubeconfig", namespace=NS))
        output = f"s3://{s3_bucket}/runs"
        assert invoke(*caption_args(output, "--run-id", "del1")).exit_code == 0
        # (CliRunner swaps sys.stdout: a second invoke on another thread would mix them up.)
        threading.Timer(0.5, lambda: fake.api_delete_job(NS, "dfk8s-del1-map", "Background")).start()
        result = invoke("reduce", f"{output}/del1", "--wait-job", "dfk8s-del1-map")
        assert result.exception is not None and result.exception.exit_code == 42
        assert "deleted" in str(result.exception)
        assert not open_storage(output).child("del1").exists(layout.SUMMARY_KEY)


def test_cluster_errors_are_one_line(tmp_path, monkeypatch, s3_env, s3_bucket):
    with FakeKube() as fake:
        monkeypatch.setenv("KUBECONFIG", fake.write_kubeconfig(tmp_path / "kubeconfig", namespace=NS))
        fake.forbid("create", "jobs")
        result = invoke(*caption_args(f"s3://{s3_bucket}/runs", "--run-id", "no1"))
        assert isinstance(result.exception, KubernetesError)
        assert str(result.exception).startswith("not allowed: jobs.batch is forbidden") and "\n" not in str(
            result.exception
        )
        assert fake.list("jobs", NS) == []
        missing = invoke("cancel", "nope")
        assert isinstance(missing.exception, KubernetesError) and "run not found" in str(missing.exception)
