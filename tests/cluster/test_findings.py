"""What the real control plane does differently from the fake that came before, one test per finding.

Each test first shows the server's own behaviour (the finding confirmed), then that dfk8s handles it.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dfk8s.cli import cli
from dfk8s.errors import SpecError
from dfk8s.kube.manifests import KubeRunConfig, build_map_job
from dfk8s.kube.profiles import load_profile
from dfk8s.storage import open_storage
from tests.cluster.conftest import CREDENTIALS, NS
from tests.conftest import DATAFLOW_ROOT, VQA_MANIFEST


def _prompt_row(text: str) -> str:
    return json.dumps({"conversations": [{"role": "user", "content": text}]})


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def caption_args(output, *extra, service_account="dfk8s-reducer"):
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
        service_account,
        *extra,
    ]


def held_flags(held, component=None) -> list[str]:
    """Submit flags that keep the run's map pods, reducer pod or both from starting (images not there)."""
    from dfk8s.kube.manifests import cpu_image

    # (Without --reducer-image, a CPU run's reducer runs the workers' image.)
    return ["--image", held.image("map") if component in (None, "map") else cpu_image(),
            "--reducer-image", held.image("reduce") if component in (None, "reduce") else cpu_image()]


def test_the_api_refuses_an_indexed_job_whose_pod_hostnames_pass_63_characters(kube_env, s3_bucket, tmp_path):
    cluster = kube_env
    # The server: a Job named within the 63 characters of a label, but whose last pod hostname
    # (<job name>-<index>) is not, is refused at create time.
    cfg = KubeRunConfig(
        run_id="r" * 49,
        pipeline="caption",
        serving="openai-chat",
        run_uri="s3://b/r",
        shards=101,
        parallelism=1,
        namespace=NS,
        profile=load_profile("caption"),
    )
    job = build_map_job(cfg)
    job["metadata"]["name"] = f"dfk8s-{'r' * 50}-map"
    assert len(job["metadata"]["name"]) == 60
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as info:
        cluster.batch.create_namespaced_job(NS, job, dry_run="All")
    assert info.value.status == 422 and "invalid DNS label" in json.loads(info.value.body)["message"]
    # dfk8s: the same run id and shard count are refused before anything is created, with the limit.
    manifest = tmp_path / "prompts.jsonl"
    manifest.write_text("".join(_prompt_row(f"p{i}") + "\n" for i in range(101)))
    result = invoke(
        "submit",
        "--pipeline",
        "text2image",
        "--serving",
        "openai-images",
        "--input",
        manifest,
        "--output",
        f"s3://{s3_bucket}/runs",
        *CREDENTIALS,
        "--run-id",
        "r" * 50,
        "--shards",
        "101",
    )
    assert isinstance(result.exception, SpecError), result.output
    assert "too long for 101 shards" in str(result.exception) and "at most 49 characters" in str(
        result.exception
    )
    assert cluster.job(NS, f"dfk8s-{'r' * 50}-map") is None
    dry = invoke(
        "submit",
        "--pipeline",
        "text2image",
        "--serving",
        "openai-images",
        "--input",
        manifest,
        "--output",
        f"s3://{s3_bucket}/runs",
        "--api-key-secret",
        "api/DF_API_KEY",
        "--run-id",
        "r" * 50,
        "--rows-per-shard",
        "1",
        "--dry-run",
    )
    assert isinstance(dry.exception, SpecError) and "too long for 101 shards" in str(dry.exception)


def test_a_reducer_without_rbac_fails_once_with_a_clear_message(kube_env, held, s3_bucket, run_id):
    cluster = kube_env
    account = f"norbac-{run_id}"
    cluster.core.create_namespaced_service_account(NS, {"metadata": {"name": account}})
    result = invoke(*caption_args(f"s3://{s3_bucket}/runs", "--run-id", run_id,
                                  *held_flags(held, "map"),  # the workers do not matter here
                                  service_account=account))
    assert result.exit_code == 0, result.output
    name = f"dfk8s-{run_id}-reduce"

    def finished():
        job = cluster.job(NS, name) or {}
        return next((c for c in job.get("status", {}).get("conditions") or () if c["type"] == "Failed"), None)

    condition = cluster.wait_for(finished, what="the reduce Job to fail", timeout=180)
    job = cluster.job(NS, name)
    # One pod, exit 42, the FailJob rule: not backoffLimit (3) retries of a pod that cannot succeed.
    assert job["status"]["failed"] == 1 and condition["reason"] == "PodFailurePolicy", job["status"]
    log = invoke("logs", run_id, "--reducer").stdout
    assert f'system:serviceaccount:{NS}:{account}" cannot list resource "jobs"' in log
    assert "needs get/list/watch on jobs" in log and "not retrying" in log
    status = invoke("status", run_id).stdout
    assert ": failed" in status
    invoke("cancel", run_id)


def test_the_ttl_controllers_foreground_deletion_is_not_a_cancel(
    kube_env, s3_bucket, fake_api, api_key, run_id
):
    cluster = kube_env
    output = f"s3://{s3_bucket}/runs"
    result = invoke(
        *caption_args(
            output,
            "--run-id",
            run_id,
            "--shards",
            "1",
            "--api-url",
            fake_api.url + "/v1",
            "--wait",
            "--poll-seconds",
            "0.5",
            "--no-progress",
        )
    )
    assert result.exit_code == 0, result.output + cluster.pod_logs(NS)
    name = f"dfk8s-{run_id}-reduce"
    # A finalizer of ours on the reducer's pod holds the foreground deletion open long enough to look.
    pod = cluster.pods(NS, f"dfk8s.io/run={run_id},dfk8s.io/component=reduce")[0]["metadata"]["name"]
    cluster.core.patch_namespaced_pod(pod, NS, {"metadata": {"finalizers": ["dfk8s.test/hold"]}})
    try:
        cluster.batch.patch_namespaced_job(name, NS, {"spec": {"ttlSecondsAfterFinished": 0}})
        expiring = cluster.wait_for(
            lambda: (lambda j: j if j and j["metadata"].get("deletionTimestamp") else None)(
                cluster.job(NS, name)
            ),
            what="the TTL controller to delete the reduce Job",
        )
        assert "foregroundDeletion" in expiring["metadata"]["finalizers"]  # the finding: foreground
        status = invoke("status", run_id)
        assert f"in namespace {NS}: complete" in status.stdout, status.output
        listing = [line.split() for line in invoke("list").stdout.splitlines() if line.startswith(run_id)]
        assert listing[0][2] == "complete"
    finally:
        cluster.core.patch_namespaced_pod(pod, NS, {"metadata": {"finalizers": None}})
    cluster.wait_for(lambda: cluster.job(NS, name) is None, what="the reduce Job to go")
    # The map Job alone (its own TTL not reached): the summary says how the run ended.
    assert f"in namespace {NS}: complete" in invoke("status", run_id).stdout
    invoke("cancel", run_id)


def test_a_missing_reducer_service_account_is_refused_and_shown(
    cluster, held, s3_env, s3_bucket, tmp_path, monkeypatch, run_id, seaweed
):
    namespace = cluster.create_namespace(f"nochart-{run_id}")
    cluster.create_secret(namespace, "api", {"DF_API_KEY": "k"})
    monkeypatch.setenv("KUBECONFIG", cluster.kubeconfig(tmp_path / "kubeconfig", namespace))
    output = f"s3://{s3_bucket}/runs"
    result = invoke(*caption_args(output, "--run-id", run_id, "--namespace", namespace))
    assert isinstance(result.exception, SpecError), result.output
    assert f"ServiceAccount dfk8s-reducer not found in namespace {namespace}" in str(result.exception)
    assert cluster.job(namespace, f"dfk8s-{run_id}-map") is None
    assert not list(open_storage(output).child(run_id).list(""))  # refused before planning
    # The Jobs created anyway (kubectl apply of the dry run): the server refuses the reducer's pods
    # with FailedCreate events only; status shows them instead of "reducing" with no reason.
    dry = invoke(*caption_args(output, "--run-id", run_id, "--namespace", namespace, "--dry-run",
                               *held_flags(held)))
    applied = cluster.kubectl("apply", "-f", "-", input=dry.stdout)
    assert applied.returncode == 0, applied.stderr
    name = f"dfk8s-{run_id}-reduce"
    events = cluster.wait_for(
        lambda: [e for e in cluster.events(namespace, name) if e.startswith("FailedCreate")],
        what="the Job controller's FailedCreate event",
    )
    assert 'serviceaccount "dfk8s-reducer" not found' in events[0]
    status = invoke("status", run_id, "--namespace", namespace)
    assert f"problem: reduce job {name} cannot create its pods:" in status.stdout, status.output
    assert 'serviceaccount "dfk8s-reducer" not found' in status.stdout
    cluster.core.delete_namespace(namespace)


def test_submit_warns_when_the_server_is_outside_the_supported_range(
    kube_env, held, s3_bucket, run_id, monkeypatch
):
    monkeypatch.setattr("dfk8s.kube.versions.SUPPORTED_KUBERNETES", ("1.20", "1.21"))
    result = invoke(*caption_args(f"s3://{s3_bucket}/runs", "--run-id", run_id, *held_flags(held)))
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if "outside the range" in line]
    assert lines == [
        f"warning: the cluster runs Kubernetes {kube_env.version}, outside the range dfk8s supports "
        "(1.20 to 1.21)"
    ]
    invoke("cancel", run_id)


def test_submit_with_only_the_charts_launcher_account(
    kube_env, s3_bucket, fake_api, tmp_path, monkeypatch, run_id
):
    """The launcher's credentials are a token of the chart's launcher ServiceAccount, not admin: every
    call submit, status, logs, list and cancel make is allowed by the chart's Role, or shows as a 403."""
    cluster = kube_env
    token = cluster.sa_token(NS, "dfk8s-launcher")
    monkeypatch.setenv("KUBECONFIG", cluster.kubeconfig(tmp_path / "launcher", NS, token=token))
    output = f"s3://{s3_bucket}/runs"
    result = invoke(
        *caption_args(
            output,
            "--run-id",
            run_id,
            "--shards",
            "2",
            "--api-url",
            fake_api.url + "/v1",
            "--wait",
            "--poll-seconds",
            "0.5",
            "--no-progress",
        )
    )
    assert result.exit_code == 0, result.output + cluster.pod_logs(NS)
    assert "8 rows: 4 ok, 4 failed" in result.stderr
    assert "complete" in invoke("status", run_id).stdout
    assert "shard 0:" in invoke("logs", run_id, "--index", "0").stdout
    assert any(line.startswith(run_id) for line in invoke("list").stdout.splitlines())
    # What the Role does not grant is refused by the real authorizer, as a one-line 403.
    denied = invoke(*caption_args(output, "--run-id", run_id, "--namespace", "default"))
    assert "not allowed: " in str(denied.exception) and "system:serviceaccount:batch:dfk8s-launcher" in str(
        denied.exception
    )
    assert invoke("cancel", run_id).exit_code == 0
