"""The fake API server speaks the wire format the official `kubernetes` client expects, and its Job
controller follows the Job rules dfk8s relies on (podFailurePolicy, backoffLimitPerIndex, ...)."""

from __future__ import annotations

import threading
import time

import pytest
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from dfk8s.kube import KubeRunConfig, build_map_job, build_reduce_job
from dfk8s.profiles import load_profile
from dfk8s.testing.fake_kube import FakeKube, field_matcher, format_indexes, label_matcher

NS = "batch"
MAP = "dfk8s-r1-map"


@pytest.fixture
def fake(tmp_path):
    with FakeKube(watch_timeout=2.0) as server:
        server.write_kubeconfig(tmp_path / "kubeconfig", namespace=NS)
        yield server


@pytest.fixture
def api(fake):
    api_client = config.new_client_from_config(config_file=fake.kubeconfig_path, persist_config=False)
    yield api_client
    api_client.close()


def make_jobs(shards=3, **overrides):
    fields = dict(
        run_id="r1",
        pipeline="caption",
        serving="openai-chat",
        run_uri="s3://b/runs/r1",
        shards=shards,
        parallelism=2,
        namespace=NS,
        profile=load_profile("caption"),
        api_key_secret=("api", "DF_API_KEY"),
    )
    fields.update(overrides)
    cfg = KubeRunConfig(**fields)
    return build_map_job(cfg), build_reduce_job(cfg)


def test_selectors_parse_like_the_api_server():
    match = label_matcher("app=x,tier!=db,env in (a, b),!gone,has")
    assert match({"app": "x", "env": "a", "has": ""})
    assert not match({"app": "x", "env": "c", "has": ""})
    assert not match({"app": "x", "env": "a", "has": "", "gone": "1"})
    assert not match({"app": "x", "tier": "db", "env": "b", "has": ""})
    assert label_matcher("k notin (v)")({"k": "w"}) and label_matcher("")({})
    with pytest.raises(ValueError):
        label_matcher("a=b=c")
    assert field_matcher("jobs", "metadata.name=j")({"metadata": {"name": "j"}})
    with pytest.raises(ValueError, match="not supported"):
        field_matcher("jobs", "spec.parallelism=1")
    assert format_indexes([5, 1, 3, 4]) == "1,3-5" and format_indexes([]) == ""


def test_create_get_list_and_conflict_through_the_real_client(fake, api):
    batch = client.BatchV1Api(api)
    map_job, reduce_job = make_jobs()
    created = batch.create_namespaced_job(NS, map_job)
    batch.create_namespaced_job(NS, reduce_job)
    assert created.metadata.uid and created.spec.selector.match_labels
    assert created.spec.template.metadata.labels["batch.kubernetes.io/job-name"] == MAP
    with pytest.raises(ApiException) as info:
        batch.create_namespaced_job(NS, map_job)
    assert info.value.status == 409 and '"reason":"AlreadyExists"' in info.value.body.replace(" ", "")
    listed = batch.list_namespaced_job(NS, label_selector="dfk8s.io/component=map")
    assert [j.metadata.name for j in listed.items] == [MAP]
    assert (
        batch.list_namespaced_job(NS, field_selector="metadata.name=dfk8s-r1-reduce")
        .items[0]
        .spec.backoff_limit
        == 3
    )
    assert batch.list_namespaced_job("other").items == []
    with pytest.raises(ApiException) as info:
        batch.read_namespaced_job("nope", NS)
    assert info.value.status == 404
    assert client.VersionApi(api).get_code().git_version.startswith("v1.")


def test_wrong_token_is_401_and_forbidden_verbs_are_403(fake, api):
    other = client.Configuration()
    other.host, other.api_key = fake.url, {"BearerToken": "Bearer wrong"}
    with pytest.raises(ApiException) as info:
        client.BatchV1Api(client.ApiClient(other)).list_namespaced_job(NS)
    assert info.value.status == 401
    fake.forbid("create", "jobs")
    with pytest.raises(ApiException) as info:
        client.BatchV1Api(api).create_namespaced_job(NS, make_jobs()[0])
    assert info.value.status == 403 and "cannot create resource" in info.value.body


def test_watch_streams_events_from_a_resource_version_and_410_after_compaction(fake, api):
    batch = client.BatchV1Api(api)
    batch.create_namespaced_job(NS, make_jobs()[0])
    rv = batch.list_namespaced_job(NS).metadata.resource_version
    events = []

    def consume():
        for event in watch.Watch().stream(
            batch.list_namespaced_job,
            NS,
            resource_version=rv,
            timeout_seconds=1,
            field_selector=f"metadata.name={MAP}",
        ):
            events.append((event["type"], event["object"].status.completed_indexes))

    thread = threading.Thread(target=consume)
    thread.start()
    time.sleep(0.2)
    fake.finish_pod(NS, MAP, 0)
    batch.delete_namespaced_job(MAP, NS, propagation_policy="Background")
    thread.join(10)
    assert ("MODIFIED", "0") in events and events[-1][0] == "DELETED"
    fake.compact()
    with pytest.raises(ApiException) as info:
        list(watch.Watch().stream(batch.list_namespaced_job, NS, resource_version=rv, timeout_seconds=1))
    assert info.value.status == 410


def test_indexed_job_rules_failindex_ignore_and_backoff_per_index(fake, api):
    batch = client.BatchV1Api(api)
    batch.create_namespaced_job(NS, make_jobs(shards=4, backoff_limit_per_index=1)[0])
    fake.finish_pod(NS, MAP, 0, 0)
    fake.evict(NS, MAP, 1)  # Ignore: not counted, retried
    fake.finish_pod(NS, MAP, 1, 0)
    fake.finish_pod(NS, MAP, 2, 42)  # FailIndex at once
    fake.finish_pod(NS, MAP, 3, 1)  # counted, retried (limit 1)
    assert batch.read_namespaced_job(MAP, NS).status.conditions is None
    fake.finish_pod(NS, MAP, 3, 1)  # second failure: over the limit
    status = batch.read_namespaced_job(MAP, NS).status
    assert status.completed_indexes == "0-1" and status.failed_indexes == "2-3"
    assert status.failed == 3 and status.succeeded == 2
    assert [(c.type, c.reason) for c in status.conditions][-1] == ("Failed", "FailedIndexes")
    pods = client.CoreV1Api(api).list_namespaced_pod(
        NS, label_selector="batch.kubernetes.io/job-completion-index=1"
    )
    evicted = [p for p in pods.items if p.status.phase == "Failed"]
    assert len(pods.items) == 2 and evicted[0].status.conditions[0].type == "DisruptionTarget"


def test_max_failed_indexes_and_end_job_stop_the_job(fake, api):
    batch = client.BatchV1Api(api)
    batch.create_namespaced_job(NS, make_jobs(shards=3, max_failed_indexes=0)[0])
    fake.start_pod(NS, MAP, 1)
    fake.finish_pod(NS, MAP, 0, 42)
    status = batch.read_namespaced_job(MAP, NS).status
    assert status.conditions[-1].reason == "MaxFailedIndexesExceeded" and not status.active
    assert (
        fake.list("pods", NS, "batch.kubernetes.io/job-completion-index=1")[0]["status"]["phase"] == "Failed"
    )
    batch.create_namespaced_job(NS, make_jobs(run_id="r2", run_uri="s3://b/runs/r2")[0])
    fake.finish_pod(NS, "dfk8s-r2-map", 2, 0)
    fake.end_job(NS, "dfk8s-r2-map")
    status = batch.read_namespaced_job("dfk8s-r2-map", NS).status
    assert status.conditions[-1].type == "Failed" and status.completed_indexes == "2"


def test_delete_orphans_pods_by_default_and_background_removes_them(fake, api):
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    map_job, reduce_job = make_jobs()
    batch.create_namespaced_job(NS, map_job)
    batch.create_namespaced_job(NS, reduce_job)
    fake.start_pod(NS, MAP, 0)
    fake.start_pod(NS, "dfk8s-r1-reduce", 0)
    batch.delete_namespaced_job(MAP, NS)  # the batch/v1 default: orphan
    left = core.list_namespaced_pod(NS, label_selector="dfk8s.io/run=r1").items
    assert len(left) == 2 and any(p.metadata.owner_references is None for p in left)
    batch.delete_namespaced_job("dfk8s-r1-reduce", NS, propagation_policy="Background")
    assert [
        p.metadata.labels["dfk8s.io/component"]
        for p in core.list_namespaced_pod(NS, label_selector="dfk8s.io/run=r1").items
    ] == ["map"]
    core.delete_collection_namespaced_pod(NS, label_selector="dfk8s.io/run=r1")
    assert core.list_namespaced_pod(NS).items == []


def test_pod_logs_plain_tail_follow_and_errors(fake, api):
    core = client.CoreV1Api(api)
    client.BatchV1Api(api).create_namespaced_job(NS, make_jobs()[0])
    pod = fake.start_pod(NS, MAP, 0, log="one\ntwo\n")
    assert core.read_namespaced_pod_log(pod, NS, container="worker") == "one\ntwo\n"
    assert core.read_namespaced_pod_log(pod, NS, tail_lines=1) == "two\n"
    with pytest.raises(ApiException) as info:
        core.read_namespaced_pod_log(pod, NS, container="nope")
    assert info.value.status == 400
    threading.Timer(0.3, lambda: fake.finish_pod(NS, MAP, 0, 0, log="three\n")).start()
    lines = list(watch.Watch().stream(core.read_namespaced_pod_log, pod, NS, container="worker"))
    assert lines == ["one", "two", "three"]


def test_run_pods_runs_commands_with_secrets_and_index(tmp_path, monkeypatch):
    monkeypatch.setenv("DF_API_KEY", "from-the-test-env")
    with FakeKube(run_pods=True) as fake:
        fake.write_kubeconfig(tmp_path / "kubeconfig", namespace=NS)
        job, _ = make_jobs(shards=2)
        container = job["spec"]["template"]["spec"]["containers"][0]
        container["command"] = ["sh", "-c", 'echo "index=$JOB_COMPLETION_INDEX key=$DF_API_KEY"; exit 0']
        fake.api_create_job(NS, job)
        # Without its Secret the pod cannot start (CreateContainerConfigError); it starts once it exists.
        fake.wait_for(
            lambda: any("CreateContainerConfigError" in str(p["status"]) for p in fake.list("pods", NS)),
            what="the missing secret to block the pods",
        )
        fake.create_secret(NS, "api", {"DF_API_KEY": "from-the-secret"})
        assert fake.wait_for(lambda: fake.job_finished(NS, MAP), timeout=20) == "Complete"
        logs = sorted(fake.pod_log(NS, p["metadata"]["name"]) for p in fake.list("pods", NS))
        assert logs == ["index=0 key=from-the-secret\n", "index=1 key=from-the-secret\n"]
