"""The run lifecycle with real processes: long-lived workers, SIGTERM checkpoints, launchers own workers.

Every test counts the requests the fake API received: a row is paid for once, whatever signal came.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from dfk8s.executors.local.pipe import worker_log_dir
from dfk8s.plan.launch import RunRequest, prepare_run

pytestmark = pytest.mark.slow


def _manifest(tmp_path: Path, n: int, name: str = "m.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": f"prompt {i}"}]}) + "\n"
                            for i in range(n)))
    return path


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.update({"DF_API_KEY": "test-key-not-secret", "DFK8S_GRACE_SECONDS": "20", **extra})
    return env


def _wait_for(predicate, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _ok(api) -> int:
    return api.stats()["by_status"].get("200", 0)


def _launch(tmp_path: Path, args: list[str], log_name: str = "launcher.log", **env) -> subprocess.Popen:
    log = open(tmp_path / log_name, "wb")
    return subprocess.Popen([sys.executable, "-m", "dfk8s", *args], stdout=log, stderr=subprocess.STDOUT,
                            env=_env(**env), cwd=tmp_path)


def _run_args(fake_api, manifest: Path, output: Path, run_id: str, *extra: str) -> list[str]:
    return ["run", "-p", "vqa", "-i", str(manifest), "-o", str(output), "--run-id", run_id,
            "--api-url", fake_api.url + "/v1", "--model", "fake-model", "--no-progress", *extra]


def _results(output: Path, run_id: str) -> list[dict]:
    return [json.loads(line) for line in (output / run_id / "result.jsonl").read_text().splitlines()]


def test_sigterm_mid_shard_checkpoints_what_finished_and_the_resume_pays_nothing_twice(tmp_path, fake_api):
    fake_api.configure(latency=0.2)
    manifest = _manifest(tmp_path, 400)
    storage, _, _ = prepare_run(RunRequest(
        pipeline="vqa", serving="openai-chat", input=str(manifest), output=str(tmp_path / "o"), run_id="term",
        rows_per_shard=400, save_interval=100,
        options={"api_url": fake_api.url + "/v1", "model": "fake-model", "max_concurrency": 16}))
    worker = [sys.executable, "-m", "dfk8s", "worker", "--run", storage.url(), "--index", "0"]
    with open(tmp_path / "worker.log", "wb") as log:
        process = subprocess.Popen(worker, stdout=log, stderr=subprocess.STDOUT, env=_env())
        _wait_for(lambda: _ok(fake_api) >= 150, what="150 answered requests")
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
    assert code not in (0, 42), "a stopped shard exits with a retryable code"
    first = fake_api.stats()["requests_total"]
    assert 150 <= first < 400
    assert "checkpointed" in (tmp_path / "worker.log").read_text()
    again = subprocess.run(worker, capture_output=True, text=True, env=_env())
    assert again.returncode == 0, again.stderr
    assert fake_api.stats()["requests_total"] == 400  # every row once: nothing finished was paid again
    rows = [json.loads(line) for line in storage.open_lines("output/00000.jsonl")]
    assert [r["conversations"][0]["content"] for r in rows] == [f"prompt {i}" for i in range(400)]
    assert all(r["answer"] for r in rows)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_to_the_launcher_stops_its_workers_gracefully_and_leaves_no_orphan(tmp_path, fake_api, sig):
    fake_api.configure(latency=0.2)
    manifest = _manifest(tmp_path, 400)
    output = tmp_path / "o"
    launcher = _launch(tmp_path, _run_args(fake_api, manifest, output, "sig", "--workers", "2",
                                           "--rows-per-shard", "100", "--max-concurrency", "8"))
    proc = psutil.Process(launcher.pid)
    workers = _wait_for(lambda: len(proc.children()) >= 2 and proc.children(), what="two workers")
    _wait_for(lambda: _ok(fake_api) >= 30, what="30 answered requests")
    launcher.send_signal(sig)
    assert launcher.wait(60) == 128 + sig
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"orphaned workers: {alive}"
    log = (tmp_path / "launcher.log").read_text()
    assert f"resume with --run-id sig: dfk8s run --run-id sig -o {output}" in log and "Traceback" not in log
    first = fake_api.stats()["requests_total"]
    resume = subprocess.run([sys.executable, "-m", "dfk8s", "run", "--run-id", "sig", "-o", str(output),
                             "--no-progress"], capture_output=True, text=True, env=_env(), cwd=tmp_path)
    assert resume.returncode == 0, resume.stderr
    assert first < 400 and fake_api.stats()["requests_total"] == 400
    assert len(_results(output, "sig")) == 400


def test_a_launcher_killed_outright_leaves_no_worker_and_a_resume_that_works_at_once(tmp_path, fake_api):
    fake_api.configure(latency=0.2)
    manifest = _manifest(tmp_path, 400)
    output = tmp_path / "o"
    launcher = _launch(tmp_path, _run_args(fake_api, manifest, output, "kill", "--workers", "2",
                                           "--rows-per-shard", "100", "--max-concurrency", "8"))
    proc = psutil.Process(launcher.pid)
    workers = _wait_for(lambda: len(proc.children()) >= 2 and proc.children(), what="two workers")
    _wait_for(lambda: _ok(fake_api) >= 30, what="30 answered requests")
    launcher.kill()
    launcher.wait(10)
    gone, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, f"workers outlived their launcher: {alive}"
    lease = json.loads((output / "kill" / "lease.json").read_text())
    assert time.time() - lease["heartbeat"] < 15  # its heartbeat is still fresh: only the pid tells
    first = fake_api.stats()["requests_total"]
    # The dead launcher ran here, in this boot: its lease does not block the resume, not even for a second.
    resume = subprocess.run([sys.executable, "-m", "dfk8s", "run", "--run-id", "kill", "-o", str(output),
                             "--no-progress"], capture_output=True, text=True, env=_env(), cwd=tmp_path)
    assert resume.returncode == 0, resume.stderr
    assert first < 400 and fake_api.stats()["requests_total"] == 400
    assert len(_results(output, "kill")) == 400


def test_a_lease_of_another_machine_keeps_the_heartbeat_rule(tmp_path):
    from dfk8s.errors import RunBusy
    from dfk8s.run.lease import RunLease
    from dfk8s.storage import open_storage

    storage = open_storage(str(tmp_path / "run"))
    other = {"owner": "x", "command": "run", "pid": 1, "host": "another-host", "boot_id": "b",
             "heartbeat": time.time(), "stale_after": 15.0}
    storage.write_json("lease.json", other)
    with pytest.raises(RunBusy, match="pid 1 on another-host"):
        RunLease(storage).acquire()
    storage.write_json("lease.json", {**other, "heartbeat": time.time() - 16})
    RunLease(storage).acquire().release()


def test_ctrl_c_then_resume_counts_time_worked_not_the_pause(tmp_path, fake_api):
    fake_api.configure(latency=0.2)
    manifest = _manifest(tmp_path, 200)
    output = tmp_path / "o"
    launcher = _launch(tmp_path, _run_args(fake_api, manifest, output, "wall", "--workers", "1",
                                           "--max-concurrency", "4"))
    _wait_for(lambda: _ok(fake_api) >= 10, what="10 answered requests")
    launcher.send_signal(signal.SIGINT)
    assert launcher.wait(60) == 130
    time.sleep(8)  # the pause between the interrupt and the resume is not work
    started = time.monotonic()
    resume = subprocess.run([sys.executable, "-m", "dfk8s", "run", "--run-id", "wall", "-o", str(output),
                             "--no-progress"], capture_output=True, text=True, env=_env(), cwd=tmp_path)
    assert resume.returncode == 0, resume.stderr
    spec = json.loads((output / "wall" / "run.json").read_text())
    summary = json.loads((output / "wall" / "summary.json").read_text())
    first_session = spec["history"][0]["seconds"]
    assert [h["action"] for h in spec["history"]] == ["run", "resume"]
    assert summary["wall_seconds"] <= first_session + (time.monotonic() - started) + 0.5
    assert summary["wall_seconds"] < time.time() - spec["created_at"] - 7


def test_one_worker_loads_flux_once_for_four_shards(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("sentencepiece")
    from dfk8s.testing.tiny_flux import build_tiny_flux

    model = build_tiny_flux(tmp_path / "flux")
    manifest = tmp_path / "t2i.jsonl"
    manifest.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": f"a fox {i}"}]})
                                + "\n" for i in range(8)))
    run_id = f"flux-once-{os.getpid()}-{time.monotonic_ns()}"
    result = subprocess.run(
        [sys.executable, "-m", "dfk8s", "run", "-p", "text2image", "--serving", "diffusers", "--model",
         str(model), "--steps", "2", "--height", "64", "--width", "64", "--dtype", "float32", "-i",
         str(manifest), "-o", str(tmp_path / "o"), "--run-id", run_id, "--shards", "4", "--workers", "1",
         "--no-progress"], capture_output=True, text=True, env=_env(HF_HUB_OFFLINE="1"), timeout=600)
    assert result.returncode == 0, result.stderr
    assert "8 rows: 8 ok, 0 failed" in result.stderr
    logs = "".join(p.read_text() for p in worker_log_dir(run_id).glob("*.log"))
    assert logs.count("shard ") and logs.count("done:") == 4
    assert logs.count("loaded FluxPipeline") == 1, logs


def test_requests_that_outlast_the_grace_period_are_cancelled_and_stay_pending(tmp_path, fake_api):
    fake_api.configure(latency=60)
    storage, _, _ = prepare_run(RunRequest(
        pipeline="vqa", serving="openai-chat", input=str(_manifest(tmp_path, 20)), output=str(tmp_path / "o"),
        run_id="grace", rows_per_shard=20,  # one shard: the test runs shard 0
        options={"api_url": fake_api.url + "/v1", "model": "fake-model", "max_concurrency": 4}))
    worker = [sys.executable, "-m", "dfk8s", "worker", "--run", storage.url(), "--index", "0"]
    process = subprocess.Popen(worker, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=_env(DFK8S_GRACE_SECONDS="1"))
    try:
        _wait_for(lambda: fake_api.stats()["inflight"] >= 4, what="four requests in flight")
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code == 143 and time.monotonic() - started < 20  # the grace (1 s) is kept, not the 60 s latency
    assert "did not finish within the grace period" in process.stderr.read()
    assert not list(storage.list("output"))
    fake_api.configure(latency=0.0)
    again = subprocess.run(worker, capture_output=True, text=True, env=_env())
    assert again.returncode == 0, again.stderr
    rows = [json.loads(line) for line in storage.open_lines("output/00000.jsonl")]
    assert len(rows) == 20 and all(r["answer"] for r in rows)
    assert fake_api.stats()["requests_total"] == 4 + 20  # the four cut off are sent again, nothing else


def test_a_long_lived_worker_sends_the_next_shards_rows_while_the_last_answers_are_in_flight(tmp_path,
                                                                                             fake_api):
    """The drain at a shard's end costs no idle slots: once every row of shard 0 is sent, the worker says
    so, takes shard 1, and shard 1's rows fill the slots shard 0's answers free, before shard 0 is done."""
    fake_api.configure(latency=0.6, keep_bodies=100)
    storage, spec, _ = prepare_run(RunRequest(
        pipeline="vqa", serving="openai-chat", input=str(_manifest(tmp_path, 12)), output=str(tmp_path / "o"),
        run_id="overlap", rows_per_shard=6,
        options={"api_url": fake_api.url + "/v1", "model": "fake-model", "max_concurrency": 4}))
    assert spec.shards == 2
    worker = subprocess.Popen([sys.executable, "-m", "dfk8s", "worker", "--run", storage.url(), "--serve"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, env=_env())

    def shard_one_requests() -> int:  # rows 6..11 are shard 1's
        prompts = [json.loads(b["body"])["messages"][-1]["content"] for b in fake_api.bodies()]
        return sum(1 for p in prompts if int(str(p).rsplit(" ", 1)[-1]) >= 6)

    try:
        worker.stdin.write("0\n")
        worker.stdin.flush()
        first = json.loads(worker.stdout.readline())
        assert first == {"index": 0, "event": "draining"}  # all six rows sent, answers still in flight
        assert shard_one_requests() == 0
        worker.stdin.write("1\n")
        worker.stdin.flush()
        replies = []
        while not any(r.get("index") == 0 and "code" in r for r in replies):
            replies.append(json.loads(worker.stdout.readline()))
        # Shard 1's rows took the slots shard 0's answers freed before shard 0 finished.
        assert shard_one_requests() >= 1
        while not any(r.get("index") == 1 and "code" in r for r in replies):
            replies.append(json.loads(worker.stdout.readline()))
        done = {r["index"]: r for r in replies if "code" in r}
        assert {i: (r["code"], r["ok"]) for i, r in done.items()} == {0: (0, 6), 1: (0, 6)}
        # Each shard says it is draining before it is done.
        assert replies.index({"index": 1, "event": "draining"}) < replies.index(done[1])
        worker.stdin.close()
        assert worker.wait(30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert _ok(fake_api) == 12  # every row once


def _workers_of(run_id: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "dfk8s worker" in cmdline.replace("-m dfk8s", "dfk8s") and run_id in cmdline:
            found.append(process)
    return found


def test_workers_started_before_the_plan_take_the_real_parallelism_and_the_extra_ones_exit(tmp_path):
    """`dfk8s run` starts its workers while it plans; with fewer shards than --workers the extra ones exit,
    and --rpm is split by the workers really running (2), not by --workers (4) they were started with."""
    run_id = f"early-{os.getpid()}-{time.monotonic_ns()}"
    result = subprocess.run(
        [sys.executable, "-m", "dfk8s", "run", "-p", "vqa", "--serving", "echo", "-i",
         str(_manifest(tmp_path, 6)), "-o", str(tmp_path / "o"), "--run-id", run_id, "--rows-per-shard", "3",
         "--workers", "4", "--rpm", "600", "--no-progress"],
        capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "6 rows: 6 ok, 0 failed" in result.stderr
    logs = {p.name: p.read_text() for p in worker_log_dir(run_id).glob("*.log")}
    assert len(logs) == 4  # all four started before the plan said there are two shards
    budgets = [line for text in logs.values() for line in text.splitlines()
               if "--rpm 600 for the run" in line]
    assert len(budgets) == 2, budgets
    assert all("300 a minute for this worker (2 workers)" in b for b in budgets), budgets
    assert _workers_of(run_id) == []


def test_a_plan_that_fails_stops_the_workers_started_for_it(tmp_path):
    run_id = f"badplan-{os.getpid()}-{time.monotonic_ns()}"
    csv = tmp_path / "table.csv"
    csv.write_text("id,prompt\n1,a cat\n2,a dog\n")
    result = subprocess.run(
        [sys.executable, "-m", "dfk8s", "run", "-p", "vqa", "--serving", "echo", "-i", str(csv),
         "-o", str(tmp_path / "o"), "--run-id", run_id, "--workers", "3", "--no-progress"],
        capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode != 0 and "neither JSON nor JSONL" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    logs = list(worker_log_dir(run_id).glob("*.log"))
    assert len(logs) == 3  # they had been started
    assert _workers_of(run_id) == []  # and were stopped: none outlives the launcher
