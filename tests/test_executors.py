"""The one Executor interface (start, follow, status, cancel): both executors implement it."""

import json

import pytest

from dfk8s.errors import SpecError
from dfk8s.executors import Executor
from dfk8s.executors.kubernetes import KubernetesExecutor
from dfk8s.executors.local.executor import LocalExecutor
from dfk8s.plan.launch import RunRequest, prepare_run


def test_both_executors_implement_the_whole_interface():
    for executor in (LocalExecutor, KubernetesExecutor):
        assert issubclass(executor, Executor) and not executor.__abstractmethods__
    assert (LocalExecutor.name, KubernetesExecutor.name) == ("local", "kubernetes")


def test_a_local_run_through_start_follow_status_and_cancel(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(
        json.dumps({"conversations": [{"role": "user", "content": f"p{i}" + (" FAIL" if i == 3 else "")}]})
        + "\n" for i in range(4)))
    storage, spec, _ = prepare_run(RunRequest(pipeline="vqa", serving="echo", input=str(manifest),
                                              output=str(tmp_path), run_id="ex", rows_per_shard=2,
                                              options={"fail_marker": "FAIL"}))
    executor = LocalExecutor(workers=1, output=str(tmp_path), show_progress=False, poll_seconds=0.1)
    before = executor.status("ex")
    assert (before.state, before.source, before.rows, before.shards) == ("unreduced", "storage", 4, 2)
    assert before.progress.rows == 0 and before.shards_done == [] and before.summary is None

    first = executor.follow(executor.start(storage, spec, only={1}))
    assert (first.ok, first.failed, first.not_processed, first.complete) == (1, 1, 2, False)
    partial = executor.status("ex")
    assert partial.state == "partial" and partial.shards_done == [1] and partial.progress.failed == 1

    executor.follow(executor.start(storage, spec))  # the rest: shard 0
    done = executor.status("ex")
    assert done.state == "complete" and done.shards_done == [0, 1] and done.progress.ok == 3
    assert done.summary["result"] == str(tmp_path / "ex" / "result.jsonl")

    cancelled = executor.cancel("ex")  # a sync run has no provider batches to cancel
    assert (cancelled.run_uri, cancelled.batches, cancelled.batch_error) == (storage.url(), [], None)
    with pytest.raises(SpecError, match="--output"):
        LocalExecutor().status("ex")


def test_worker_logs_go_under_dfk8s_log_dir_else_the_temporary_folder(tmp_path, monkeypatch):
    import tempfile

    from dfk8s.executors.local.pipe import LOG_DIR_ENV, worker_log_dir

    monkeypatch.setenv(LOG_DIR_ENV, str(tmp_path / "logs"))
    assert worker_log_dir("run-1") == tmp_path / "logs" / "dfk8s-run-1"
    assert (tmp_path / "logs" / "dfk8s-run-1").is_dir()
    monkeypatch.delenv(LOG_DIR_ENV)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    assert worker_log_dir("run-2") == tmp_path / "tmp" / "dfk8s-run-2"
