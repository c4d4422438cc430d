"""`dfk8s submit / status / logs / list / cancel` and the reduce Job, against the real control plane.

kube-apiserver, the Job controller, the garbage collector and the scheduler are the real ones
(tests/cluster/controlplane.py); the pods run on a real kubelet and containerd (tests/cluster/node.py),
from the CPU image, against SeaweedFS and the fake OpenAI server. The chart is installed in namespace
batch (release dfk8s), so the reduce Job runs as the chart's reducer ServiceAccount with the pod's own
token (in-cluster config).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading

from click.testing import CliRunner

from dfk8s.cli import cli
from dfk8s.errors import KubernetesError
from dfk8s.run import layout
from dfk8s.storage import open_storage
from tests.cluster.conftest import CREDENTIALS, NS
from tests.cluster.node import NODE_NAME
from tests.conftest import DATAFLOW_ROOT, VQA_MANIFEST

INDEX = "batch.kubernetes.io/job-completion-index"


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
        *CREDENTIALS,
        *extra,
    ]


def wait_args(fake_api):
    return ["--api-url", fake_api.url + "/v1", "--wait", "--poll-seconds", "0.5", "--no-progress"]


def run_pods(cluster, run_id, component="map"):
    return cluster.pods(NS, f"dfk8s.io/run={run_id},dfk8s.io/component={component}")


def test_submit_wait_status_logs_list_cancel(kube_env, s3_bucket, fake_api, api_key, run_id):
    cluster = kube_env
    output = f"s3://{s3_bucket}/runs"
    result = invoke(
        *caption_args(
            output,
            "--run-id",
            run_id,
            "--shards",
            "2",
            "--parallelism",
            "2",
            "--model",
            "gpt-5-nano",
            "--max-concurrency",
            "4",
            *wait_args(fake_api),
        )
    )
    assert result.exit_code == 0, result.output + cluster.pod_logs(NS)
    assert result.stdout.splitlines()[0] == run_id
    assert f"created jobs dfk8s-{run_id}-map, dfk8s-{run_id}-reduce in namespace batch" in result.stderr
    assert f"dfk8s status {run_id} -n batch" in result.stderr and "8 rows: 4 ok, 4 failed" in result.stderr
    assert "outside the supported range" not in result.stderr
    storage = open_storage(output).child(run_id)
    rows = [json.loads(line) for line in storage.open_lines(layout.RESULT_KEY)]
    assert [r["conversation"] for r in rows] == [
        r["conversation"] for r in json.loads(VQA_MANIFEST.read_text())
    ]
    assert sum("caption" in r for r in rows) == 4
    assert any(key.startswith("staged/") for key in storage.list("staged"))

    # The real scheduler placed every pod on the node, and its kubelet reported how each ended.
    pods = run_pods(cluster, run_id)
    assert len(pods) == 2 and {p["spec"]["nodeName"] for p in pods} == {NODE_NAME}
    for pod in pods:
        assert pod["status"]["phase"] == "Succeeded"
        terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        assert terminated["exitCode"] == 0 and terminated["reason"] == "Completed"
        assert pod["spec"]["hostname"] == f"dfk8s-{run_id}-map-{pod['metadata']['annotations'][INDEX]}"
    reducer = run_pods(cluster, run_id, "reduce")[0]
    assert (
        reducer["spec"]["serviceAccountName"] == "dfk8s-reducer" and reducer["status"]["phase"] == "Succeeded"
    )

    status = invoke("status", run_id)
    assert status.exit_code == 0, status.output
    assert "in namespace batch: complete" in status.stdout and "2/2 indexes completed (0,1)" in status.stdout
    assert "8/8 rows (4 ok, 4 failed); 2/2 shards done" in status.stdout
    assert f"result: {output}/{run_id}/result.jsonl" in status.stdout
    # The storage facts come from the builder a local run's status uses: the spend too.
    spent = storage.read_json(layout.SUMMARY_KEY)["cost_usd"]
    assert f"spent: ${spent:.6f}; estimate $" in status.stdout, status.stdout
    as_json = json.loads(invoke("status", run_id, "--json").stdout)
    assert as_json["state"] == "complete" and as_json["map_job"]["completed"] == [0, 1]

    # Logs come through the API server's pods/log, which asks the kubelet.
    logs = invoke("logs", run_id, "--index", "1")
    assert logs.exit_code == 0 and "shard 1: 2 ok, 2 failed" in logs.stdout, logs.output
    assert f"job dfk8s-{run_id}-map: Complete" in invoke("logs", run_id, "--reducer").stdout
    assert invoke("logs", run_id).stdout.count(f"==> dfk8s-{run_id}-map-") == 2
    followed = invoke("logs", run_id, "--index", "0", "--follow", "--tail", "1")
    assert followed.exit_code == 0 and "shard 0: 2 ok, 2 failed" in followed.stdout
    assert len(followed.stdout.splitlines()) == 1
    assert "--follow streams one pod" in invoke("logs", run_id, "--follow").output
    listing = invoke("list").stdout.splitlines()
    assert listing[0].split() == ["RUN", "PIPELINE", "STATE", "SHARDS", "FAILED", "CREATED"]
    assert [line.split()[:5] for line in listing if line.startswith(run_id)] == [
        [run_id, "caption", "complete", "2/2", "-"]
    ]

    jobs = json.dumps([cluster.job(NS, f"dfk8s-{run_id}-map"), cluster.job(NS, f"dfk8s-{run_id}-reduce")])
    everything = (
        result.output + status.output + logs.output + jobs + storage.read_bytes(layout.RUN_SPEC_KEY).decode()
    )
    assert api_key not in everything
    assert (
        cluster.job(NS, f"dfk8s-{run_id}-map")["spec"]["template"]["spec"]["automountServiceAccountToken"]
        is False
    )

    again = invoke(*caption_args(output, "--run-id", run_id))
    assert isinstance(again.exception, KubernetesError) and "already exists" in str(again.exception)
    cancelled = invoke("cancel", run_id)
    assert cancelled.exit_code == 0, cancelled.output
    assert f"deleted jobs dfk8s-{run_id}-map, dfk8s-{run_id}-reduce" in cancelled.stderr
    assert f"its data stays at {output}/{run_id}" in cancelled.stderr
    cluster.wait_for(lambda: not cluster.pods(NS, f"dfk8s.io/run={run_id}"), what="the run's pods to go")
    assert cluster.job(NS, f"dfk8s-{run_id}-map") is None
    assert storage.exists(layout.RESULT_KEY) and storage.exists(layout.SUMMARY_KEY)
    gone = invoke("status", run_id)
    assert isinstance(gone.exception, KubernetesError) and "run not found" in str(gone.exception)
    from_storage = invoke("status", run_id, "--output", output).stdout
    assert "in namespace batch: complete" in from_storage and "map job: none" in from_storage


def test_failed_index_and_evicted_pod_are_reduced_and_reported(
    kube_env, held, s3_bucket, fake_api, api_key, run_id, seaweed
):
    cluster, output = kube_env, f"s3://{s3_bucket}/runs"
    # Neither the workers' image nor the reducer's is on the node yet: every pod waits to start.
    map_image, reduce_image = held.image("map"), held.image("reduce")
    result = invoke(
        *caption_args(
            output,
            "--run-id",
            run_id,
            "--shards",
            "4",
            "--parallelism",
            "4",
            "--api-url",
            fake_api.url + "/v1",
            "--image",
            map_image,
            "--reducer-image",
            reduce_image,
        )
    )
    assert result.exit_code == 0, result.output
    pods = cluster.wait_for(
        lambda: (lambda p: p if len(p) == 4 else None)(run_pods(cluster, run_id)), what="4 map pods"
    )
    # Shard 1's input is gone when its pod starts: the worker exits 42 and the FailIndex rule fails
    # the index at once. The input comes back before the reducer reads it.
    storage = open_storage(output).child(run_id)
    shard1 = storage.read_bytes(layout.shard_input_key(1))
    storage.delete(layout.shard_input_key(1))
    # Index 2's pod is evicted through the Eviction API: the API server adds DisruptionTarget, and the
    # Job controller's Ignore rule creates a new pod without counting a failure.
    evicted = next(p for p in pods if p["metadata"]["annotations"][INDEX] == "2")
    cluster.core.create_namespaced_pod_eviction(
        evicted["metadata"]["name"],
        NS,
        {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": evicted["metadata"]["name"]}},
    )
    cluster.wait_for(
        lambda: len(cluster.pods(NS, f"dfk8s.io/run={run_id},{INDEX}=2")) == 2,
        what="the evicted pod to be replaced",
    )
    held.release(map_image)
    cluster.wait_for(
        lambda: cluster.job(NS, f"dfk8s-{run_id}-map")["status"].get("failedIndexes") == "1",
        what="index 1 to fail",
    )
    storage.write_bytes(layout.shard_input_key(1), shard1)
    held.release(reduce_image)
    follow = invoke("status", run_id)
    assert follow.exit_code == 0
    reducer = cluster.wait_for(
        lambda: (cluster.job(NS, f"dfk8s-{run_id}-reduce") or {}).get("status", {}).get("succeeded"),
        what="the reduce Job",
        timeout=180,
    )
    assert reducer == 1, cluster.pod_logs(NS)
    summary = storage.read_json(layout.SUMMARY_KEY)
    assert summary["failed_shards"] == [1], (
        summary,
        cluster.job(NS, f"dfk8s-{run_id}-map")["status"],
        cluster.pod_logs(NS),
    )
    assert (
        summary["failed_shards"] == [1] and summary["finished_shards"] == 3 and summary["not_processed"] == 2
    )
    errors = [json.loads(line) for line in storage.open_lines(layout.ERRORS_KEY)]
    assert any("shard 1: its shard failed" in e["error"]["message"] for e in errors)
    job = cluster.job(NS, f"dfk8s-{run_id}-map")["status"]
    assert job["completedIndexes"] == "0,2,3" and job["failedIndexes"] == "1" and job["failed"] == 1
    failed_pod = [p for p in run_pods(cluster, run_id) if p["metadata"]["annotations"][INDEX] == "1"]
    assert (
        failed_pod
        and failed_pod[0]["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 42
    )
    status = invoke("status", run_id).stdout
    assert "partial" in status and "failed indexes 1" in status and "failed shards: 1" in status
    # Cancel, fix the cause, submit the same run id: only shard 1 is processed again.
    assert invoke("cancel", run_id).exit_code == 0
    cluster.wait_for(
        lambda: (
            cluster.job(NS, f"dfk8s-{run_id}-map") is None
            and cluster.job(NS, f"dfk8s-{run_id}-reduce") is None
        ),
        what="the Jobs to go",
    )
    requests_before = len(fake_api.requests())
    resumed = invoke(*caption_args(output, "--run-id", run_id, "--parallelism", "2", *wait_args(fake_api)))
    assert resumed.exit_code == 0, resumed.output + cluster.pod_logs(NS)
    assert f"run {run_id}: resumed 8 rows in 4 shards" in resumed.stderr
    assert len(fake_api.requests()) - requests_before == 1  # shard 1 holds one good row
    summary = storage.read_json(layout.SUMMARY_KEY)
    assert summary["complete"] and summary["failed_shards"] == [] and summary["ok"] == 4


def test_map_job_failed_with_some_indexes_done_is_still_reduced(
    kube_env, s3_bucket, fake_api, api_key, run_id, held
):
    """--max-failed-indexes 0: shard 1 fails for good, so the Job ends Failed after shard 0; the reducer
    (a pod of the reduce Job, in-cluster credentials) assembles what exists and names the rest."""
    cluster, output = kube_env, f"s3://{s3_bucket}/runs"
    map_image, reduce_image = held.image("map"), held.image("reduce")  # no pod starts before released
    result = invoke(
        *caption_args(
            output,
            "--run-id",
            run_id,
            "--shards",
            "3",
            "--parallelism",
            "1",
            "--max-failed-indexes",
            "0",
            *wait_args(fake_api)[:2],
            "--image",
            map_image,
            "--reducer-image",
            reduce_image,
        )
    )
    assert result.exit_code == 0, result.output
    # Shard 1's input is gone when its pod starts (exit 42, FailIndex); back before the reducer reads.
    storage = open_storage(output).child(run_id)
    shard1 = storage.read_bytes(layout.shard_input_key(1))
    storage.delete(layout.shard_input_key(1))
    held.release(map_image)
    cluster.wait_for(
        lambda: any(
            c["type"] == "Failed"
            for c in cluster.job(NS, f"dfk8s-{run_id}-map")["status"].get("conditions") or ()
        ),
        what="the map Job to fail",
        timeout=180,
    )
    storage.write_bytes(layout.shard_input_key(1), shard1)
    held.release(reduce_image)
    cluster.wait_for(
        lambda: (cluster.job(NS, f"dfk8s-{run_id}-reduce") or {}).get("status", {}).get("succeeded"),
        what="the reduce Job",
        timeout=180,
    )
    map_job = cluster.job(NS, f"dfk8s-{run_id}-map")
    failed = [c for c in map_job["status"]["conditions"] if c["type"] == "Failed"]
    assert failed and failed[0]["reason"] == "MaxFailedIndexesExceeded", map_job["status"]
    summary = storage.read_json(layout.SUMMARY_KEY)
    assert summary["finished_shards"] == 1 and summary["failed_shards"] == [1, 2]
    assert len(list(storage.open_lines(layout.RESULT_KEY))) == 8
    reducer_log = invoke("logs", run_id, "--reducer").stdout
    assert f"job dfk8s-{run_id}-map: Failed (MaxFailedIndexesExceeded)" in reducer_log
    status = invoke("status", run_id).stdout
    assert (
        f"map job: dfk8s-{run_id}-map: Failed (MaxFailedIndexesExceeded), 1/3 indexes completed (0)" in status
    )
    assert "failed shards: 1,2" in status and ": partial" in status


def test_reduce_stops_when_the_map_job_is_deleted(kube_env, held, s3_bucket, run_id):
    cluster, output = kube_env, f"s3://{s3_bucket}/runs"
    held_images = ["--image", held.image("map"), "--reducer-image", held.image("reduce")]
    assert invoke(*caption_args(output, "--run-id", run_id, *held_images)).exit_code == 0
    # The reducer as its own process, through $KUBECONFIG, watching the real API.
    reducer = subprocess.Popen(
        [sys.executable, "-m", "dfk8s", "reduce", f"{output}/{run_id}", "--wait-job", f"dfk8s-{run_id}-map"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        timer = threading.Timer(
            2.0,
            lambda: cluster.batch.delete_namespaced_job(
                f"dfk8s-{run_id}-map", NS, propagation_policy="Background"
            ),
        )
        timer.start()
        out, err = reducer.communicate(timeout=120)
    finally:
        reducer.kill()
    assert reducer.returncode == 42, out + err
    assert "deleted" in err
    assert not open_storage(output).child(run_id).exists(layout.SUMMARY_KEY)
    invoke("cancel", run_id)


def test_cluster_errors_are_one_line(kube_env, s3_bucket, tmp_path, monkeypatch, run_id):
    cluster = kube_env
    # A ServiceAccount with no Role at all: the real RBAC authorizer refuses, and the CLI says so in one line.
    cluster.core.create_namespaced_service_account(NS, {"metadata": {"name": f"nobody-{run_id}"}})
    token = cluster.sa_token(NS, f"nobody-{run_id}")
    monkeypatch.setenv("KUBECONFIG", cluster.kubeconfig(tmp_path / "nobody", NS, token=token))
    result = invoke(*caption_args(f"s3://{s3_bucket}/runs", "--run-id", run_id))
    assert isinstance(result.exception, KubernetesError), result.output
    message = str(result.exception)
    assert message.startswith("not allowed: ") and "\n" not in message
    assert f"system:serviceaccount:{NS}:nobody-{run_id}" in message and "forbidden" in message
    assert cluster.job(NS, f"dfk8s-{run_id}-map") is None
    missing = invoke("cancel", "nope")
    assert isinstance(missing.exception, KubernetesError) and "not allowed" in str(missing.exception)
