"""Caption / VQA through the real openai SDK against the fake server: fixtures, faults, kill -9, secrets."""

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from dfk8s.cli import cli
from dfk8s.executors.local.launch import run_local
from dfk8s.plan.launch import RunRequest, prepare_run
from dfk8s.run import layout
from dfk8s.run.spec import RunSpec
from dfk8s.servings.base import Message, Request
from dfk8s.servings.openai_chat import OpenAIChatServing
from dfk8s.servings.openai_common import normalise_base_url
from dfk8s.storage import open_storage
from tests.conftest import DATAFLOW_ROOT, T2I_EVAL_MANIFEST, VQA_MANIFEST


def _lines(storage, key):
    return [json.loads(line) for line in storage.open_lines(key)]


def _prompts(tmp_path, n, *, suffix=lambda i: ""):
    path = tmp_path / "prompts.jsonl"
    with path.open("w") as f:
        for i in range(n):
            turn = {"from": "human", "value": f"q{i}{suffix(i)}"}
            f.write(json.dumps({"id": i, "conversation": [turn]}) + "\n")
    return path


def test_cli_run_on_vqa_fixture_prints_run_and_result(tmp_path, fake_api, api_key):
    result = CliRunner().invoke(cli, [
        "run", "--pipeline", "caption", "--input", str(VQA_MANIFEST), "--image-root", str(DATAFLOW_ROOT),
        "--output", str(tmp_path), "--api-url", fake_api.url + "/v1", "--model", "gpt-5-nano",
        "--workers", "2", "--max-concurrency", "8", "--temperature", "0.2", "--max-tokens", "64",
        "--run-id", "cap1"])
    assert result.exit_code == 0, result.output
    assert "run cap1" in result.output and "8 rows: 4 ok, 4 failed" in result.output
    storage = open_storage(str(tmp_path / "cap1"))
    rows = _lines(storage, layout.RESULT_KEY)
    manifest_rows = json.loads(VQA_MANIFEST.read_text())
    assert [r["conversation"] for r in rows] == [r["conversation"] for r in manifest_rows]
    good = [r for r in rows if "caption" in r]
    assert len(good) == 4 and all("fake caption:" in r["caption"] for r in good)
    assert all(r["error"]["type"] == "BadRow" for r in rows if "Face.jpg" in r["image"][0])
    sent = fake_api.requests()
    assert len(sent) == 4
    for req in sent:
        body = req["body"]
        assert body["model"] == "gpt-5-nano" and body["temperature"] == 0.2 and body["max_tokens"] == 64
        system = body["messages"][0]
        assert system["role"] == "system" and "caption generator" in system["content"]
        assert "<image>" not in req["prompt"] and req["image_mimes"] == ["image/png"]
    # No secret anywhere a user or a log can see.
    assert api_key not in result.output
    assert api_key not in storage.read_bytes(layout.RUN_SPEC_KEY).decode()


def test_text2image_eval_fixture_as_vqa_on_s3(tmp_path, fake_api, api_key, s3_bucket):
    output = f"s3://{s3_bucket}/runs"
    request = RunRequest(pipeline="vqa", input=str(T2I_EVAL_MANIFEST), image_root=str(DATAFLOW_ROOT),
                         output=output, run_id="eval", options={"api_url": fake_api.url})
    summary = run_local(request, workers=1)
    rows = _lines(open_storage(output).child("eval"), layout.RESULT_KEY)
    assert summary.ok == 2 and [("answer" in r) for r in rows] == [True, True]
    assert "Text Caption: a brown horse" in fake_api.requests()[0]["prompt"] or \
        "Text Caption: a brown horse" in fake_api.requests()[1]["prompt"]
    assert all(r["body"]["messages"][0]["role"] == "user" for r in fake_api.requests())  # vqa: no system


def test_mime_type_comes_from_bytes(tmp_path, fake_api, api_key):
    src = (DATAFLOW_ROOT / "dataflow/example/vqa/ggbond.png").read_bytes()
    (tmp_path / "really_png.jpg").write_bytes(src)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "really_png.jpg",
                                    "conversation": [{"from": "human", "value": "x"}]}))
    summary = run_local(RunRequest(pipeline="caption", input=str(manifest), output=str(tmp_path / "o"),
                                   options={"api_url": fake_api.url}), workers=1)
    assert summary.ok == 1 and fake_api.requests()[0]["image_mimes"] == ["image/png"]


def _serving(fake_api, tmp_path, **options):
    spec = RunSpec(run_id="t", pipeline="vqa", serving="openai-chat", shards=1,
                   options={"api_url": fake_api.url, **options})
    return OpenAIChatServing.from_spec(spec)


def _request(text):
    return Request(row_id=text, messages=[Message("user", text)])


def test_retry_after_is_honoured_and_attempts_counted(fake_api, api_key, tmp_path):
    fake_api.configure(fail_first=2, retry_after=0.6)
    serving = _serving(fake_api, tmp_path, max_retries=5)
    started = time.monotonic()
    [answer] = asyncio.run(serving.run([_request("hello")]))
    elapsed = time.monotonic() - started
    assert answer.attempts == 3 and answer.text.startswith("fake caption")
    assert elapsed >= 2 * 0.6  # two waits of exactly what Retry-After said
    assert fake_api.stats()["by_status"] == {"429": 2, "200": 1}


def test_gives_up_after_max_retries_with_an_error_record(fake_api, api_key, tmp_path):
    fake_api.configure(fail_first=10, retry_after=0.05)
    [answer] = asyncio.run(_serving(fake_api, tmp_path, max_retries=2).run([_request("x")]))
    assert answer.type == "RateLimited" and answer.attempts == 3
    assert fake_api.stats()["requests_total"] == 3


def test_refusal_empty_and_bad_credentials(fake_api, api_key, tmp_path, monkeypatch):
    serving = _serving(fake_api, tmp_path, max_retries=1)
    [refused] = asyncio.run(serving.run([_request("please [[refuse]]")]))
    assert refused.type == "Refusal"
    fake_api.configure(rate_empty=1.0)
    [empty] = asyncio.run(serving.run([_request("y")]))
    assert empty.type == "EmptyResponse" and empty.attempts == 2
    monkeypatch.delenv("DF_API_KEY")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    from dfk8s.errors import SpecError

    with pytest.raises(SpecError, match="DF_API_KEY"):
        _serving(fake_api, tmp_path)


def test_base_url_is_joined_without_double_v1():
    assert normalise_base_url("http://h:1") == "http://h:1/v1"
    assert normalise_base_url("http://h:1/v1/") == "http://h:1/v1"
    assert normalise_base_url("http://h:1/v1/chat/completions") == "http://h:1/v1"
    assert normalise_base_url("https://x/api/openai") == "https://x/api/openai"


def test_fault_mix_every_row_ends_ok_or_with_an_error_record(tmp_path, fake_api, api_key):
    fake_api.configure(rate_429=0.15, retry_after=0.05, rate_5xx=0.1, rate_malformed=0.05, rate_empty=0.05,
                       rate_hang=0.05, hang_seconds=30, latency=0.01, seed=7)
    manifest = _prompts(tmp_path, 120, suffix=lambda i: " [[500]]" if i % 40 == 0 else "")
    summary = run_local(RunRequest(pipeline="vqa", input=str(manifest), output=str(tmp_path), run_id="mix",
                                   rows_per_shard=40, options={"api_url": fake_api.url, "timeout": 0.5,
                                                               "max_retries": 3, "max_concurrency": 16}),
                        workers=2)
    rows = _lines(open_storage(str(tmp_path / "mix")), layout.RESULT_KEY)
    assert [r["id"] for r in rows] == list(range(120))
    assert all(("answer" in r) != ("error" in r) for r in rows)
    failed = [r for r in rows if "error" in r]
    assert {r["id"] for r in failed} >= {0, 40, 80}  # always-500 rows give up with a record
    assert all(r["error"]["attempts"] == 4 for r in failed if r["id"] in (0, 40, 80))
    assert summary.ok + summary.failed == 120 and summary.complete
    stats = fake_api.stats()
    assert stats["by_status"].get("429", 0) > 0 and stats["max_inflight"] <= 2 * 16


def _start_worker(run_uri, env):
    return subprocess.Popen([sys.executable, "-m", "dfk8s", "worker", "--run", run_uri, "--index", "0"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_gives_every_row_exactly_once(tmp_path, fake_api, api_key):
    # Slow enough that a worker cannot finish its 150 rows between two kills (the lean path starts fast).
    fake_api.configure(latency=0.12)
    manifest = _prompts(tmp_path, 150)
    storage, spec, _ = prepare_run(RunRequest(pipeline="vqa", input=str(manifest), output=str(tmp_path),
                                              run_id="k9", save_interval=7, rows_per_shard=150,
                                              options={"api_url": fake_api.url, "max_concurrency": 4}))
    env = dict(os.environ)
    rng = random.Random(1234)
    kills = 0
    for _ in range(12):
        proc = _start_worker(storage.url(), env)
        try:
            proc.wait(timeout=rng.uniform(0.8, 2.0))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            continue
        assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
        break
    else:
        proc = _start_worker(storage.url(), env)
        assert proc.wait(timeout=120) == 0
    assert kills >= 2  # the test really interrupted the worker
    out = _lines(storage, layout.shard_output_key(0))
    assert [r["id"] for r in out] == list(range(150))
    assert all(r["answer"].startswith("fake caption: q") for r in out)
    done = json.loads(storage.read_bytes(layout.shard_done_key(0)))
    assert done["rows"] == 150 and done["ok"] == 150
    # Rows redone after a kill are only the ones not yet checkpointed: far fewer than a full redo.
    assert fake_api.stats()["requests_total"] < 150 * 3


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_run_resumes(tmp_path, fake_api, api_key):
    fake_api.configure(latency=0.2)
    manifest = _prompts(tmp_path, 60)
    args = [sys.executable, "-m", "dfk8s", "run", "-p", "vqa", "-i", str(manifest), "-o", str(tmp_path),
            "--run-id", "ctrlc", "--api-url", fake_api.url, "--max-concurrency", "2", "--workers", "2",
            "--rows-per-shard", "15", "--save-interval", "2"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    storage = open_storage(str(tmp_path / "ctrlc"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(storage.list("parts")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "resume with --run-id ctrlc" in err
    assert not storage.exists(layout.RESULT_KEY)
    requests_before = fake_api.stats()["requests_total"]
    resumed = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    rows = _lines(storage, layout.RESULT_KEY)
    assert [r["id"] for r in rows] == list(range(60)) and all("answer" in r for r in rows)
    assert fake_api.stats()["requests_total"] - requests_before < 60  # checkpointed rows were not redone
