"""The pure parts of the Kubernetes executor: flags, Job state, run state, estimates, waiting, connecting."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from urllib3.exceptions import ProtocolError

from dfk8s import kube
from dfk8s.errors import KubernetesError, SpecError
from dfk8s.executors import kubernetes
from dfk8s.executors.kubernetes.wait import (
    JobDeleted,
    JobState,
    WaitNotAllowed,
    format_indexes,
    job_state,
    parse_indexes,
    wait_for_job_end,
)
from dfk8s.kube.client import connect, default_namespace
from dfk8s.kube.profiles import load_profile
from dfk8s.plan.launch import RunRequest, prepare_run
from tests.conftest import DATAFLOW_ROOT, VQA_MANIFEST


@pytest.fixture(autouse=True)
def _repo_profiles(monkeypatch):
    monkeypatch.delenv("DFK8S_JOBS_DIR", raising=False)


@pytest.mark.parametrize(
    ("text", "indexes"),
    [
        ("", []),
        (None, []),
        ("0", [0]),
        ("1,3-5", [1, 3, 4, 5]),
        ("0-2,4,6-7", [0, 1, 2, 4, 6, 7]),
        ("3,1", [1, 3]),
    ],
)
def test_index_lists_parse_and_format_like_the_job_controller(text, indexes):
    assert parse_indexes(text) == indexes
    assert parse_indexes(format_indexes(indexes)) == indexes


@pytest.mark.parametrize(
    ("indexes", "text"),
    [([], ""), ([0], "0"), ([0, 1], "0,1"), ([0, 2, 3], "0,2,3"), ([1, 3, 4, 5, 7, 8], "1,3-5,7,8")],
)
def test_index_lists_are_written_as_the_job_controller_writes_them(indexes, text):
    # What kube-controller-manager put in status.completedIndexes of a real Job: "0,2,3", not "0,2-3".
    assert format_indexes(indexes) == text


@pytest.mark.parametrize("bad", ["a", "1-", "-1", "5-3", "1,,x", "1;2"])
def test_bad_index_lists_are_refused(bad):
    with pytest.raises(ValueError):
        parse_indexes(bad)


def job(conditions=(), **status):
    return {
        "metadata": {"name": "j"},
        "spec": {"completions": 4},
        "status": {**status, "conditions": list(conditions)},
    }


def test_job_state_reads_conditions_and_indexes():
    running = job_state(job(completedIndexes="0,2", failedIndexes="", active=1))
    assert running.finished is None and running.completed == [0, 2] and running.phase == "Running"
    assert running.describe() == "Running, 2/4 indexes completed (0,2), 1 active"
    failed = job_state(
        job(
            [
                {"type": "FailureTarget", "status": "True"},
                {"type": "Failed", "status": "True", "reason": "FailedIndexes", "message": "m"},
            ],
            completedIndexes="0-2",
            failedIndexes="3",
            failed=2,
        )
    )
    assert failed.finished == "Failed" and failed.failed_indexes == [3] and failed.reason == "FailedIndexes"
    assert "failed indexes 3" in failed.describe()
    assert job_state(job([{"type": "Complete", "status": "True"}])).finished == "Complete"
    assert job_state(job([{"type": "Complete", "status": "False"}])).finished is None
    assert job_state({"metadata": {"name": "q"}, "spec": {"suspend": True}}).phase == "Suspended"


def test_run_state_from_both_jobs():
    done, failed = JobState("m", finished="Complete"), JobState("m", finished="Failed")
    running, reduced = JobState("m"), JobState("r", finished="Complete")
    assert kubernetes.run_state(running, JobState("r")) == "running"
    assert kubernetes.run_state(JobState("m", suspended=True), JobState("r")) == "queued"
    assert kubernetes.run_state(done, JobState("r")) == "reducing"
    assert kubernetes.run_state(done, reduced) == "complete"
    assert kubernetes.run_state(failed, reduced) == "partial"
    assert kubernetes.run_state(failed, JobState("r", finished="Failed")) == "failed"
    assert kubernetes.run_state(JobState("m", deleting=True), None) == "cancelling"
    assert kubernetes.run_state(None, None) == "gone"


def test_flag_parsing():
    assert kube.parse_secret_ref("api/DF_API_KEY", "--x") == ("api", "DF_API_KEY")
    assert kube.parse_secret_ref("api:DF_API_KEY", "--x") == ("api", "DF_API_KEY")
    with pytest.raises(SpecError) as info:
        kube.parse_secret_ref("sk-proj-abcdef", "--api-key-secret")
    assert "sk-proj-abcdef" not in str(info.value)
    assert kube.parse_node_selector(("a=b", "c=")) == {"a": "b", "c": ""}
    assert kube.parse_node_selector(()) is None
    assert kube.parse_toleration("nvidia.com/gpu:NoSchedule") == {
        "key": "nvidia.com/gpu",
        "operator": "Exists",
        "effect": "NoSchedule",
    }
    assert kube.parse_toleration("pool=gpu:NoExecute")["value"] == "gpu"
    for bad in ("nokey", "k=v:Sometimes", ":NoSchedule"):
        with pytest.raises(SpecError):
            kube.parse_toleration(bad)


def test_estimate_is_bound_by_rpm_or_concurrency():
    by_rpm = kubernetes.estimate_api_time("openai-chat", 6000, pods=4, concurrency=64, rpm=600)
    assert by_rpm.bound == "rpm" and by_rpm.per_minute == 600 and by_rpm.minutes == 10
    # 2 pods x 4 in flight x 60 s / 3 s per request = 160 requests/min.
    by_concurrency = kubernetes.estimate_api_time("openai-chat", 320, pods=2, concurrency=4, rpm=None)
    assert (
        by_concurrency.bound == "concurrency"
        and by_concurrency.per_minute == 160
        and by_concurrency.minutes == 2
    )
    assert kubernetes.estimate_api_time("diffusers", 10, 1, 1, None) is None


def test_credentials_policy():
    options = kube.ClusterOptions(namespace="ns", api_key_secret=None)
    with pytest.raises(SpecError, match="create a Secret"):
        kube.check_credentials("openai-chat", options, environ={})
    with pytest.raises(SpecError, match=r"\$OPENAI_API_KEY stays on this machine"):
        kube.check_credentials("openai-images", options, environ={"OPENAI_API_KEY": "x"})
    # The variables named are the serving's own (the registry's): Gemini's GOOGLE_API_KEY was left out
    # of a list restated here, and OpenAI's key is not a Gemini key.
    with pytest.raises(SpecError, match=r"\$GOOGLE_API_KEY stays on this machine"):
        kube.check_credentials("gemini-images", options, environ={"GOOGLE_API_KEY": "x"})
    with pytest.raises(SpecError) as refused:
        kube.check_credentials("gemini-images", options, environ={"OPENAI_API_KEY": "x"})
    assert "stays on this machine" not in str(refused.value)
    warnings = kube.check_credentials(
        "diffusers", options, environ={"AWS_ACCESS_KEY_ID": "a", "HF_TOKEN": "t"}
    )
    assert len(warnings) == 3 and any("S3 credentials" in w for w in warnings)
    assert (
        kube.check_credentials(
            "openai-chat",
            kube.ClusterOptions(
                namespace="ns", api_key_secret=("a", "b"), s3_secret="s", service_account="sa"
            ),
            environ={},
        )
        == []
    )


def test_profile_defaults_fill_what_no_flag_set():
    profile = load_profile("caption")
    merged = kubernetes.apply_profile_defaults(
        {"max_concurrency": 64, "model": "mine"}, profile, explicit={"model"}
    )
    assert merged["model"] == "mine" and merged["max_concurrency"] == profile.defaults["max_concurrency"]
    assert merged == {**profile.defaults, "model": "mine"}  # every other default filled in


@pytest.mark.parametrize(
    ("shards", "rows_per_shard"), [(3, None), (None, 3), (8, None), (20, None), (None, None)]
)
def test_dry_run_counts_what_plan_writes(tmp_path, shards, rows_per_shard):
    request = RunRequest(
        pipeline="caption",
        output=str(tmp_path),
        input=str(VQA_MANIFEST),
        image_root=str(DATAFLOW_ROOT),
        shards=shards,
        rows_per_shard=rows_per_shard,
    )
    rows, good, counted_shards, counted_size = kubernetes.count_plan(request)
    _, spec, _ = prepare_run(request, executor="kubernetes")  # as submit plans it
    assert (rows, counted_shards, counted_size) == (spec.rows, spec.shards, spec.rows_per_shard)
    assert good == 4


class FlakyBatch:
    """A BatchV1Api stand-in: lists from a script; its watch ends at once."""

    def __init__(self, script):
        self.script = list(script)
        self.calls = 0

    def list_namespaced_job(self, namespace, **kwargs):
        if kwargs.get("watch"):
            return SimpleNamespace(
                status=200, stream=lambda **_: iter(()), close=lambda: None, release_conn=lambda: None
            )
        self.calls += 1
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return SimpleNamespace(items=step, metadata=SimpleNamespace(resource_version="7"))


def test_wait_survives_lost_connections_and_ends_on_a_condition():
    done = job([{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}], completedIndexes="1")
    batch = FlakyBatch([ProtocolError("reset"), [job()], [done]])
    pauses = []
    state = wait_for_job_end(batch, "ns", "j", sleep=pauses.append, watch_seconds=1)
    assert state.finished == "Failed" and state.completed == [1] and pauses == [1.0] and batch.calls == 3
    with pytest.raises(JobDeleted) as info:
        wait_for_job_end(FlakyBatch([[]]), "ns", "j")
    assert info.value.exit_code == 42


def test_connect_uses_the_kubeconfig_context_or_the_pod(tmp_path, monkeypatch):
    config = tmp_path / "config"
    config.write_text("""
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "http://127.0.0.1:1"}}]
users: [{name: u, user: {token: t}}]
contexts:
- {name: one, context: {cluster: c, user: u, namespace: team-a}}
- {name: two, context: {cluster: c, user: u}}
current-context: one
""")
    monkeypatch.setenv("KUBECONFIG", str(config))
    assert default_namespace() == "team-a" and default_namespace(context="two") == "default"
    clients = connect(context="one")
    assert clients.namespace == "team-a" and "127.0.0.1:1" in clients.where
    clients.close()
    with pytest.raises(KubernetesError, match="cannot reach the Kubernetes API"):
        kubernetes.list_runs(connect(), "team-a")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    assert default_namespace() == "default"
    with pytest.raises(KubernetesError, match="cannot load the kubeconfig"):
        connect()
    monkeypatch.delenv("KUBECONFIG")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    with pytest.raises(KubernetesError, match="service account"):  # in a pod, without its token here
        connect()


def test_files_only_this_machine_has_are_refused(tmp_path):
    request = RunRequest(
        pipeline="imageedit",
        output="s3://b/runs",
        input=str(VQA_MANIFEST),
        serving="openai-images",
        options={"mask": str(tmp_path / "mask.png")},
    )
    with pytest.raises(SpecError, match="pods cannot read it"):
        kubernetes.dry_run(request, kube.ClusterOptions(namespace="ns", api_key_secret=("a", "b")))


def api_exception(status, headers=None):
    from kubernetes.client.exceptions import ApiException

    exc = ApiException(status=status, reason="x")
    exc.headers = headers or {}
    exc.body = json.dumps({"kind": "Status", "message": f"status {status}"})
    return exc


def test_wait_retries_a_429_after_its_retry_after():
    """API priority and fairness answers 429 with Retry-After: the reducer waits, it does not fail."""
    done = job([{"type": "Complete", "status": "True"}], completedIndexes="0-3")
    batch = FlakyBatch([api_exception(429, {"Retry-After": "7"}), [done]])
    pauses = []
    state = wait_for_job_end(batch, "ns", "j", sleep=pauses.append, watch_seconds=1)
    assert state.finished == "Complete" and pauses == [7.0]


def test_wait_without_rbac_fails_once_with_exit_42():
    """A 403 cannot heal by retrying the pod: exit 42 (FailJob) and say which permission is missing."""
    with pytest.raises(WaitNotAllowed) as info:
        wait_for_job_end(FlakyBatch([api_exception(403)]), "ns", "j", sleep=lambda s: None)
    assert info.value.exit_code == 42
    assert "get/list/watch on jobs" in str(info.value) and "--service-account" in str(info.value)


def test_a_finished_run_expired_by_its_ttl_is_not_cancelling():
    """The TTL controller deletes finished Jobs with foreground propagation: they show deleting."""
    done = JobState("m", finished="Complete", deleting=True)
    reduced = JobState("r", finished="Complete", deleting=True)
    assert kubernetes.run_state(done, reduced) == "complete"
    assert kubernetes.run_state(JobState("m", finished="Failed", deleting=True), reduced) == "partial"
    assert kubernetes.run_state(JobState("m", deleting=True), JobState("r")) == "cancelling"
    assert kubernetes.run_state(done, JobState("r", deleting=True)) == "cancelling"


@pytest.mark.parametrize(("shards", "longest"), [(1, 50), (100, 50), (101, 49), (1001, 48), (100_000, 47)])
def test_run_ids_leave_room_for_the_pod_hostnames(shards, longest):
    from dfk8s.kube.manifests import max_run_id_length

    assert max_run_id_length(shards) == longest
    assert len(f"dfk8s-{'r' * longest}-map-{shards - 1}") <= 63
