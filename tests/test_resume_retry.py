"""Honest resumes, the run lease, `dfk8s retry` of only the failed rows, and exit codes that mean something.

Request counts at the fake API prove what was sent: rows that succeeded are never sent again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dfk8s.executors.local.pipe import worker_log_dir
from dfk8s.run import layout


def _manifest(tmp_path: Path, texts: list[str], name: str = "m.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": t}]}) + "\n"
                            for t in texts))
    return path


def _dfk8s(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DF_API_KEY": "test-key-not-secret"}
    return subprocess.run([sys.executable, "-m", "dfk8s", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)


def _api_run(fake_api, manifest: Path, output: Path, run_id: str, *extra: str) -> list[str]:
    return ["run", "-p", "vqa", "-i", str(manifest), "-o", str(output), "--run-id", run_id, "--api-url",
            fake_api.url + "/v1", "--model", "fake-model", "--no-progress", *extra]


def _rows(output: Path, run_id: str) -> list[dict]:
    return [json.loads(line) for line in (output / run_id / "result.jsonl").read_text().splitlines()]


def test_retry_sends_only_the_retryable_failures_and_records_the_changed_options(tmp_path, fake_api):
    texts = [f"prompt {i}" + (" [[refuse]]" if i % 10 == 0 else "") for i in range(60)]
    manifest = _manifest(tmp_path, texts)
    output = tmp_path / "o"
    fake_api.configure(rate_5xx=0.3, seed=3)
    first = _dfk8s(tmp_path, *_api_run(fake_api, manifest, output, "r", "--max-retries", "0",
                                       "--rows-per-shard", "20", "--workers", "2"))
    assert first.returncode == 0, first.stderr
    assert fake_api.stats()["requests_total"] == 60
    summary = json.loads((output / "r" / "summary.json").read_text())
    by_type = summary["errors_by_type"]
    server_errors = by_type["ServerError"]["count"]
    assert by_type["Refusal"]["count"] == 6 and server_errors > 3
    assert "ServerError: " in first.stderr and "Refusal: 6 rows, e.g." in first.stderr
    failed_before = {r["conversations"][0]["content"] for r in _rows(output, "r") if "error" in r}

    fake_api.configure(rate_5xx=0.0)
    retry = _dfk8s(tmp_path, "retry", "r", "-o", str(output), "--max-retries", "2", "--no-progress")
    assert retry.returncode == 0, retry.stderr
    assert f"retrying {server_errors} rows" in retry.stderr and "max_retries 0 -> 2" in retry.stderr
    # Only the server errors went out again: not the rows that succeeded, not the refusals.
    assert fake_api.stats()["requests_total"] == 60 + server_errors
    rows = _rows(output, "r")
    assert [r["conversations"][0]["content"] for r in rows] == texts
    assert [("error" in r) for r in rows] == [i % 10 == 0 for i in range(60)]
    assert {r["conversations"][0]["content"] for r in rows if "error" in r} < failed_before
    spec = json.loads((output / "r" / "run.json").read_text())
    assert spec["options"]["max_retries"] == 2
    retried = [h for h in spec["history"] if h["action"] == "retry"]
    assert retried[-1]["changes"] == {"max_retries": [0, 2]} and retried[-1]["rows"] == server_errors

    # --errors chooses the types: the refusals go out again (and are refused again), nothing else does.
    again = _dfk8s(tmp_path, "retry", "r", "-o", str(output), "--errors", "Refusal", "--no-progress")
    assert again.returncode == 0, again.stderr
    assert fake_api.stats()["requests_total"] == 60 + server_errors + 6
    assert len(_rows(output, "r")) == 60


def test_retry_no_run_reopens_without_an_api_key_and_names_the_next_commands(tmp_path, fake_api):
    """--no-run sends nothing: a Kubernetes run's key lives in a Secret, not in this shell."""
    manifest = _manifest(tmp_path, ["p0", "p1 [[500]]"])
    output = tmp_path / "o"
    assert _dfk8s(tmp_path, *_api_run(fake_api, manifest, output, "n", "--max-retries", "0")).returncode == 0
    env = {k: v for k, v in os.environ.items() if k not in ("DF_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY")}
    reopened = subprocess.run([sys.executable, "-m", "dfk8s", "retry", "n", "-o", str(output), "--no-run"],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert reopened.returncode == 0, reopened.stderr
    assert "retrying 1 row in 1 shard (ServerError 1)" in reopened.stderr  # no "1 rows" or "1 shards"
    assert f"dfk8s run --run-id n -o {output}" in reopened.stderr
    assert fake_api.stats()["requests_total"] == 2
    assert not (output / "n" / layout.shard_done_key(1)).exists()


def test_retry_all_errors_takes_every_failed_row(tmp_path, fake_api):
    texts = [f"p{i}" + (" [[refuse]]" if i < 3 else "") for i in range(8)]
    manifest = _manifest(tmp_path, texts)
    output = tmp_path / "o"
    assert _dfk8s(tmp_path, *_api_run(fake_api, manifest, output, "a")).returncode == 0
    nothing = _dfk8s(tmp_path, "retry", "a", "-o", str(output), "--no-progress")
    assert nothing.returncode == 0 and "retrying 0 rows" in nothing.stderr
    assert fake_api.stats()["requests_total"] == 8
    every = _dfk8s(tmp_path, "retry", "a", "-o", str(output), "--all-errors", "--no-progress")
    assert every.returncode == 0 and "retrying 3 rows" in every.stderr
    assert fake_api.stats()["requests_total"] == 11


def test_resume_needs_no_flags_and_refuses_a_changed_one_in_one_line(tmp_path, fake_api):
    manifest = _manifest(tmp_path, [f"p{i}" for i in range(5)])
    output = tmp_path / "o"
    assert _dfk8s(tmp_path, *_api_run(fake_api, manifest, output, "h")).returncode == 0
    plain = _dfk8s(tmp_path, "run", "--run-id", "h", "-o", str(output), "--no-progress")
    assert plain.returncode == 0, plain.stderr
    assert "resumed 5 rows" in plain.stderr
    changed = _dfk8s(tmp_path, "run", "--run-id", "h", "-o", str(output), "--model", "other-model")
    assert changed.returncode == 2  # the command line is what to change (the README's exit codes)
    lines = changed.stderr.strip().splitlines()
    assert len(lines) == 1 and "--model other-model differs" in lines[0] and "dfk8s retry h" in lines[0]
    assert "Traceback" not in changed.stderr
    assert fake_api.stats()["requests_total"] == 5  # neither resume sent anything
    # Flags that are not part of the run (how many workers, where the bar goes) may change freely.
    workers = _dfk8s(tmp_path, "run", "--run-id", "h", "-o", str(output), "--workers", "3", "--no-progress")
    assert workers.returncode == 0, workers.stderr
    new = _dfk8s(tmp_path, "run", "-o", str(output), "--run-id", "nope")
    assert new.returncode == 2 and "--pipeline is required to start a new run" in new.stderr


def test_a_second_launcher_is_refused_while_the_lease_is_fresh(tmp_path, fake_api):
    manifest = _manifest(tmp_path, [f"p{i}" for i in range(3)])
    output = tmp_path / "o"
    assert _dfk8s(tmp_path, *_api_run(fake_api, manifest, output, "l")).returncode == 0
    assert not (output / "l" / "lease.json").exists()  # released at the end
    lease = {"owner": "someone-else", "command": "run", "pid": 1, "host": "elsewhere",
             "heartbeat": time.time(), "stale_after": 15}
    (output / "l" / "lease.json").write_text(json.dumps(lease))
    busy = _dfk8s(tmp_path, "run", "--run-id", "l", "-o", str(output), "--no-progress")
    assert busy.returncode == 3
    assert len(busy.stderr.strip().splitlines()) == 1 and "already being launched" in busy.stderr
    retry = _dfk8s(tmp_path, "retry", "l", "-o", str(output), "--no-progress")
    assert retry.returncode == 3
    lease["heartbeat"] = time.time() - 60  # its launcher died a minute ago: the lease is stale
    (output / "l" / "lease.json").write_text(json.dumps(lease))
    taken = _dfk8s(tmp_path, "run", "--run-id", "l", "-o", str(output), "--no-progress")
    assert taken.returncode == 0, taken.stderr


def test_every_row_failed_exits_non_zero_with_errors_grouped_by_type(tmp_path, fake_api):
    manifest = _manifest(tmp_path, [f"p{i} [[refuse]]" for i in range(20)])
    output = tmp_path / "o"
    result = _dfk8s(tmp_path, *_api_run(fake_api, manifest, output, "f"))
    assert result.returncode == 1
    assert "20 rows: 0 ok, 20 failed" in result.stderr and "every row failed" in result.stderr
    summary = json.loads((output / "f" / "summary.json").read_text())
    assert summary["errors_by_type"]["Refusal"]["count"] == 20
    assert summary["errors_by_type"]["Refusal"]["example"]


def test_max_failed_fraction_trips_on_a_partial_failure(tmp_path, fake_api):
    texts = [f"p{i}" + (" [[refuse]]" if i % 3 == 0 else "") for i in range(9)]
    manifest = _manifest(tmp_path, texts)
    output = tmp_path / "o"
    ok = _dfk8s(tmp_path, *_api_run(fake_api, manifest, output, "m1"))
    assert ok.returncode == 0 and "9 rows: 6 ok, 3 failed" in ok.stderr
    strict = _dfk8s(tmp_path, *_api_run(fake_api, manifest, output, "m2", "--max-failed-fraction", "0.2"))
    assert strict.returncode == 1 and "more than --max-failed-fraction 0.2" in strict.stderr


def test_a_tripped_breaker_stops_the_run_with_its_one_line(tmp_path, monkeypatch):
    """The executor's side of the breaker contract: a worker exits 42 after writing breaker.json."""
    from dfk8s.executors.local.executor import BreakerTripped, LocalExecutor
    from dfk8s.plan.launch import RunRequest, prepare_run

    manifest = _manifest(tmp_path, [f"p{i}" for i in range(6)])
    storage, spec, _ = prepare_run(RunRequest(pipeline="vqa", serving="echo", input=str(manifest),
                                              output=str(tmp_path / "o"), run_id="b", rows_per_shard=2))
    # Shard 0's input is made unreadable, so its worker exits 42 (ShardError); the breaker.json a tripped
    # circuit breaker leaves is written by hand here, as the serving's breaker would.
    storage.write_bytes("input/00000.jsonl", b"{not json\n")
    original = LocalExecutor._on_reply

    def on_reply(self, storage_, worker, reply, todo):
        if reply.get("code") == 42:
            storage_.write_json("breaker.json", {"shard": 0, "type": "ModelNotFound",
                                                 "message": "model 'gpt-x' does not exist",
                                                 "hint": "check --model"})
        return original(self, storage_, worker, reply, todo)

    monkeypatch.setattr(LocalExecutor, "_on_reply", on_reply)
    with pytest.raises(BreakerTripped, match="model 'gpt-x' does not exist; check --model") as caught:
        LocalExecutor(workers=1, show_progress=False).execute(storage, spec)
    assert caught.value.exit_code == 42
    assert caught.value.summary.failed_shards  # reduced before stopping: the rest is resumable
    assert storage.exists("result.jsonl")


def test_rpm_is_split_by_the_workers_really_running_not_by_the_first_run(tmp_path):
    from dfk8s.executors.local.executor import LocalExecutor
    from dfk8s.plan.launch import RunRequest, prepare_run

    manifest = _manifest(tmp_path, [f"p{i}" for i in range(8)])
    run_id = f"rpm-{os.getpid()}-{time.monotonic_ns()}"
    # Planned by a run with one worker (run.json: parallelism 1), resumed with four.
    storage, spec, _ = prepare_run(RunRequest(pipeline="vqa", serving="echo", input=str(manifest),
                                              output=str(tmp_path / "o"), run_id=run_id, rows_per_shard=2,
                                              options={"rpm": 600}, parallelism=1))
    assert spec.parallelism == 1 and spec.shards == 4
    LocalExecutor(workers=4, show_progress=False).execute(storage, spec)
    logs = "".join(p.read_text() for p in worker_log_dir(run_id).glob("*.log"))
    budgets = [line for line in logs.splitlines() if "--rpm 600 for the run" in line]
    assert budgets and all("150 a minute for this worker (4 workers)" in line for line in budgets), budgets


@pytest.mark.parametrize("stale", [False, True])
def test_of_launchers_that_start_at_once_exactly_one_gets_the_lease(tmp_path, stale):
    import threading

    from dfk8s.errors import RunBusy
    from dfk8s.run.lease import RunLease
    from dfk8s.storage import open_storage

    storage = open_storage(str(tmp_path / "run"))
    if stale:  # a launcher that died long ago: its lease is taken over (written, then read back)
        storage.write_json("lease.json", {"owner": "dead", "heartbeat": time.time() - 600, "stale_after": 15})
    start, outcomes, leases = threading.Barrier(6), [], []

    def launch():
        start.wait()
        try:
            leases.append(RunLease(storage).acquire())
            outcomes.append("held")
        except RunBusy:
            outcomes.append("busy")

    threads = [threading.Thread(target=launch) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    try:
        assert sorted(outcomes) == ["busy"] * 5 + ["held"]
        assert storage.read_json("lease.json")["owner"] == leases[0].owner
    finally:
        for lease in leases:
            lease.release()
    assert not storage.exists("lease.json")
