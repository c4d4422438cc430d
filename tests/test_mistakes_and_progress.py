"""Mistakes get one line (never a traceback), and progress is live: the bar, the logs above it, status."""

from __future__ import annotations

import io
import json
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from dfk8s.cli import cli
from dfk8s.plan.launch import RunRequest, prepare_run
from tests.conftest import SEED_DOCS


def _dfk8s(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {**os.environ, "DF_API_KEY": "test-key-not-secret"}
    return subprocess.run([sys.executable, "-m", "dfk8s", *args], capture_output=True, text=True,
                          env=env if env is not None else base, cwd=tmp_path, timeout=300)


def _one_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode not in (0, None), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def _text_manifest(tmp_path: Path, n: int = 3) -> Path:
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": f"p{i}"}]}) + "\n"
                            for i in range(n)))
    return path


def _echo_run(manifest: Path, output: str, *extra: str) -> list[str]:
    return ["run", "-p", "vqa", "--serving", "echo", "-i", str(manifest), "-o", output, "--no-progress",
            *extra]


def test_output_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    line = _one_line(_dfk8s(tmp_path, *_echo_run(_text_manifest(tmp_path), str(tmp_path / "afile"))))
    assert "is a file, not a folder" in line


def test_output_below_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    line = _one_line(_dfk8s(tmp_path, *_echo_run(_text_manifest(tmp_path), str(tmp_path / "afile" / "runs"))))
    assert "is a file, not a folder" in line


def test_read_only_output_is_one_line(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        line = _one_line(_dfk8s(tmp_path, *_echo_run(_text_manifest(tmp_path), str(folder))))
    finally:
        folder.chmod(stat.S_IRWXU)
    assert "read-only" in line


def test_missing_bucket_is_one_line(tmp_path, s3_env):
    line = _one_line(_dfk8s(tmp_path, *_echo_run(_text_manifest(tmp_path), "s3://no-such-bucket-here/runs"),
                            env={**os.environ}))
    assert "bucket 'no-such-bucket-here' does not exist" in line


def test_s3_without_an_endpoint_is_one_line_with_the_hint(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    line = _one_line(_dfk8s(tmp_path, *_echo_run(_text_manifest(tmp_path), "s3://bucket/runs"), env=env))
    assert "needs an S3 endpoint" in line and "--s3-endpoint" in line


def test_a_csv_input_is_one_line(tmp_path):
    csv = tmp_path / "data.csv"
    csv.write_text("image,question\na.png,what is it\nb.png,and this\n")
    line = _one_line(_dfk8s(tmp_path, *_echo_run(csv, str(tmp_path / "o"))))
    assert "neither JSON nor JSONL" in line and str(csv) in line


@pytest.mark.parametrize("text", ['{"rows": [{"conversations": []}]}',
                                  '{\n  "rows": [\n    {"conversations": []}\n  ]\n}\n'])
def test_a_json_object_input_is_one_line(tmp_path, text):
    obj = tmp_path / "data.json"
    obj.write_text(text)
    line = _one_line(_dfk8s(tmp_path, *_echo_run(obj, str(tmp_path / "o"))))
    assert "JSON object" in line


def test_an_image_root_that_does_not_exist_is_one_line(tmp_path):
    args = _echo_run(_text_manifest(tmp_path), str(tmp_path / "o"), "--image-root", str(tmp_path / "nowhere"))
    line = _one_line(_dfk8s(tmp_path, *args))
    assert "--image-root" in line and "does not exist" in line


def test_every_image_missing_is_one_line_with_the_image_root_hint(tmp_path):
    manifest = tmp_path / "caption.jsonl"
    manifest.write_text("".join(json.dumps({"images": [f"pics/{i}.png"], "conversations": [
        {"role": "user", "content": "<image>\ndescribe"}]}) + "\n" for i in range(4)))
    line = _one_line(_dfk8s(tmp_path, "run", "-p", "caption", "--serving", "echo", "-i", str(manifest), "-o",
                            str(tmp_path / "o"), "--no-progress"))
    assert "--image-root" in line and "not found" in line


def test_a_loopback_endpoint_given_to_submit_is_a_warning_not_an_error(tmp_path):
    result = _dfk8s(tmp_path, "submit", "-p", "vqa", "-i", str(_text_manifest(tmp_path)), "-o", "s3://b/runs",
                    "--s3-endpoint", "http://127.0.0.1:9", "--api-url", "http://localhost:9/v1",
                    "--kubeconfig", str(tmp_path / "no-kubeconfig"))
    assert "warning: --s3-endpoint http://127.0.0.1:9 is a loopback address" in result.stderr
    assert "--cluster-s3-endpoint" in result.stderr
    assert "warning: --api-url http://localhost:9/v1 is a loopback address" in result.stderr
    assert "Traceback" not in result.stderr


def test_workers_publish_live_counts_between_checkpoints(tmp_path, fake_api):
    from dfk8s.run.progress import ProgressReader

    fake_api.configure(latency=0.2)
    storage, _, _ = prepare_run(RunRequest(
        pipeline="vqa", serving="openai-chat", input=str(_text_manifest(tmp_path, 200)), run_id="live",
        output=str(tmp_path / "o"), save_interval=1000, rows_per_shard=200,  # one shard: the test runs 0
        options={"api_url": fake_api.url + "/v1", "model": "m", "max_concurrency": 4}))
    env = {**os.environ, "DF_API_KEY": "k", "DFK8S_PROGRESS_SECONDS": "0.5"}
    worker = [sys.executable, "-m", "dfk8s", "worker", "--run", storage.url(), "--index", "0"]
    process = subprocess.Popen(worker, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        reader = ProgressReader(storage)
        deadline = time.monotonic() + 120
        seen = 0
        while time.monotonic() < deadline and not seen:
            if not list(storage.list("output")):
                seen = reader.poll().rows if not list(storage.list("parts")) else 0
            time.sleep(0.2)
        assert seen > 0, "progress moved before any checkpoint part was written"
        live = storage.read_json("progress/00000.json")
        assert live["shard"] == 0 and live["rows"] == 200 and live["done"] >= 1
    finally:
        process.terminate()
        process.wait(60)


def test_log_lines_go_above_the_bar_through_its_console():
    from rich.console import Console

    from dfk8s.run.progress import logs_above, progress_bar

    out = io.StringIO()
    bar = progress_bar(10, enabled=True)
    bar.live.console = Console(file=out, force_terminal=True, width=100)
    bar.disable = False
    root = logging.getLogger()
    before = list(root.handlers)
    with bar, logs_above(bar):
        assert [type(h).__name__ for h in root.handlers] == ["_ConsoleHandler"]
        logging.getLogger("dfk8s.test").warning("shard 3 retrying")
    assert root.handlers == before
    assert "shard 3 retrying" in out.getvalue()


def test_status_finds_a_local_run_under_the_default_runs_folder_without_a_kubeconfig(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    result = CliRunner().invoke(cli, ["run", "-p", "vqa", "--serving", "echo", "-i",
                                      str(_text_manifest(tmp_path, 4)), "--run-id", "here", "--no-progress"])
    assert result.exit_code == 0, result.output
    status = CliRunner().invoke(cli, ["status", "here"])
    assert status.exit_code == 0, status.output
    assert "progress: 4/4 rows" in status.output


def test_seed_docs_still_run(tmp_path):
    result = _dfk8s(tmp_path, "run", "-p", "caption", "--serving", "echo", "-i",
                    str(SEED_DOCS / "caption.json"), "-o", str(tmp_path / "o"), "--no-progress")
    assert result.returncode == 0, result.stderr
