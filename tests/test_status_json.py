"""dfk8s status --json: the same keys for a local run (its storage) and a cluster run (Jobs + storage)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from dfk8s.cli import cli
from dfk8s.cli.status_json import STATUS_KEYS, from_status
from dfk8s.executors.kubernetes import JobState
from dfk8s.plan.launch import RunRequest, prepare_run
from dfk8s.run.progress import Progress
from dfk8s.run.status import RunStatus
from dfk8s.worker.shard import process_shard


def _status_json(tmp_path, run_id):
    result = CliRunner().invoke(cli, ["status", run_id, "--output", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_local_run_before_and_after_the_reduce(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))  # no cluster anywhere
    manifest = tmp_path / "m.jsonl"
    rows = [
        {"conversations": [{"role": "user", "content": f"p{i}" + (" FAIL" if i == 4 else "")}]}
        for i in range(6)
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    storage, _, _ = prepare_run(
        RunRequest(
            pipeline="vqa",
            serving="echo",
            input=str(manifest),
            output=str(tmp_path),
            run_id="js",
            rows_per_shard=2,
            options={"fail_marker": "FAIL"},
        )
    )
    process_shard(storage, 2)
    before = _status_json(tmp_path, "js")
    assert tuple(before) == STATUS_KEYS
    assert before | {"summary": None} == {
        "run_id": "js",
        "state": "unreduced",
        "source": "storage",
        "namespace": None,
        "pipeline": "vqa",
        "serving": "echo",
        "run_uri": str(tmp_path / "js"),
        "rows": 6,
        "shards": 3,
        "done": 2,
        "ok": 1,
        "failed": 1,
        "shards_done": [2],
        "failed_shards": [],
        "map_job": None,
        "reduce_job": None,
        "result": None,
        "summary": None,
        "storage_error": None,
        "breaker": None,
    }
    from dfk8s.reduce.reducer import reduce_run

    reduce_run(storage)
    after = _status_json(tmp_path, "js")
    assert tuple(after) == STATUS_KEYS
    assert after["state"] == "partial" and after["failed_shards"] == [0, 1]
    assert after["result"] == str(tmp_path / "js" / "result.jsonl")
    assert after["summary"]["not_processed"] == 4 and after["summary"]["failed"] == 1
    # The text display says the same things.
    text = CliRunner().invoke(cli, ["status", "js", "--output", str(tmp_path)]).stdout
    assert "progress: 2/6 rows (1 ok, 1 failed); 1/3 shards done (2)" in text
    assert f"result: {after['result']}: 6 rows, 1 ok, 1 failed, 4 not processed" in text
    assert "failed shards: 0,1" in text  # the same line a cluster run's status has


def test_cluster_status_has_the_same_keys():
    status = RunStatus(
        run_id="r9",
        source="cluster",
        namespace="batch",
        state="partial",
        pipeline="caption",
        run_uri="s3://b/runs/r9",
        rows=8,
        shards=2,
        progress=Progress(rows=4, ok=3, failed=1, shards_done=1),
        shards_done=[1],
        map_job=JobState(
            name="dfk8s-r9-map", finished="Failed", completions=2, completed=[1], failed_indexes=[0]
        ),
        reduce_job=JobState(name="dfk8s-r9-reduce", finished="Complete"),
        summary={
            "serving": "openai-chat",
            "failed_shards": [0],
            "result": "s3://b/runs/r9/result.jsonl",
            "rows": 8,
            "ok": 3,
            "failed": 1,
            "not_processed": 4,
            "complete": False,
        },
    )
    doc = from_status(status)
    assert tuple(doc) == STATUS_KEYS
    assert (doc["source"], doc["namespace"], doc["serving"], doc["done"], doc["ok"], doc["failed"]) == (
        "cluster",
        "batch",
        "openai-chat",
        4,
        3,
        1,
    )
    assert doc["map_job"]["failed_indexes"] == [0] and doc["reduce_job"]["finished"] == "Complete"
    assert doc["failed_shards"] == [0] and doc["result"] == "s3://b/runs/r9/result.jsonl"
    assert json.loads(json.dumps(doc)) == doc  # plain JSON
    gone = from_status(
        RunStatus(run_id="r0", source="cluster", namespace="batch", state="gone", storage_error="Timeout")
    )
    assert tuple(gone) == STATUS_KEYS and gone["done"] is None and gone["storage_error"] == "Timeout"
