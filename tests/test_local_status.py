"""Local runs are first-class in `status` and `list`: found by id, shown live, never a kubeconfig error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

pytestmark = pytest.mark.slow


def _env(tmp_path) -> dict:
    # No cluster anywhere: a kubeconfig that does not exist, no in-cluster service account.
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    return {**env, "KUBECONFIG": str(tmp_path / "no-kubeconfig"), "HOME": str(tmp_path), "DF_API_KEY": "k"}


def _dfk8s(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dfk8s", *args], capture_output=True, text=True,
                          env=_env(tmp_path), cwd=tmp_path, timeout=120)


def _wait(predicate, timeout: float = 60.0, what: str = "it"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_an_unknown_run_is_named_not_found_and_no_kubeconfig_is_asked_for(tmp_path):
    result = _dfk8s(tmp_path, "status", "nope")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[0].startswith("error: run nope not found under ./runs")
    assert "kubeconfig" not in result.stderr.split("(")[0].lower()
    elsewhere = _dfk8s(tmp_path, "status", "nope", "--output", str(tmp_path / "o"))
    assert elsewhere.returncode == 2 and f"run nope not found under {tmp_path / 'o'}" in elsewhere.stderr


def test_a_live_local_run_shows_as_running_with_its_rate_eta_and_spend_and_is_listed(tmp_path, fake_api):
    fake_api.configure(latency=0.5)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": f"q{i}"}]}) + "\n"
                                for i in range(120)))
    prices = tmp_path / "prices.yaml"
    prices.write_text(yaml.safe_dump({"table": "t", "date": "2026-12-01", "models": {"m": {
        "provider": "openai", "input_per_mtok": 1000.0, "output_per_mtok": 1000.0,
        "typical_output_tokens": 10}}}))
    launcher = subprocess.Popen(
        [sys.executable, "-m", "dfk8s", "run", "-p", "vqa", "-i", str(manifest), "--run-id", "live",
         "--api-url", fake_api.url + "/v1", "--model", "m", "--prices", str(prices), "--workers", "1",
         "--max-concurrency", "2", "--rows-per-shard", "60"],
        env=_env(tmp_path), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def running():
            result = _dfk8s(tmp_path, "status", "live")
            return result if "running: launcher pid" in result.stdout and "rows/s" in result.stdout \
                and "spent: $0.0" not in result.stdout and "spent: $" in result.stdout else None

        shown = _wait(running, what="status to show the live run with its rate and spend")
        assert f"launcher pid {launcher.pid}" in shown.stdout and ": running" in shown.stdout
        assert "ETA" in shown.stdout and "resume with" not in shown.stdout
        listed = _dfk8s(tmp_path, "list")
        assert listed.returncode == 0, listed.stderr
        (line,) = [line for line in listed.stdout.splitlines() if line.startswith("live ")]
        assert "running" in line and "/120" in line
        as_json = json.loads(_dfk8s(tmp_path, "list", "--json").stdout)
        assert [(r["run_id"], r["state"], r["source"]) for r in as_json] == [("live", "running", "storage")]
    finally:
        launcher.send_signal(signal.SIGINT)
        launcher.wait(60)
    # Not live any more: the next step is named.
    stopped = _dfk8s(tmp_path, "status", "live")
    assert ": unreduced" in stopped.stdout and "resume with `dfk8s run --run-id live" in stopped.stdout


def test_progress_lines_come_when_stderr_is_not_a_terminal(tmp_path, fake_api):
    fake_api.configure(latency=0.5)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": f"q{i}"}]}) + "\n"
                                for i in range(50)))
    result = _dfk8s(tmp_path, "run", "-p", "vqa", "-i", str(manifest), "--run-id", "plain", "--api-url",
                    fake_api.url + "/v1", "--model", "m", "--workers", "1", "--max-concurrency", "2")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("plain: ")]
    # ~12 s of work: at least one plain line (every ~10 s), with the facts a log reader needs.
    assert lines, result.stderr
    assert "/50 rows (" in lines[0] and "rows/s" in lines[0] and "ETA" in lines[0]
