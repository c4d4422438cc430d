"""--api-mode batch end to end: the real openai SDK against the fake's Batch API."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from dfk8s.cli import cli
from dfk8s.executors.local.launch import run_local
from dfk8s.plan.launch import RunRequest, dry_run, prepare_run
from dfk8s.run import layout
from dfk8s.servings import batch_mode as batch
from dfk8s.storage import open_storage
from dfk8s.worker.shard import process_shard
from tests.test_spend import _captions


def _options(fake_api, **extra):
    return {"api_url": fake_api.url + "/v1", "model": "gpt-4o", "api_mode": "batch",
            "batch_poll_seconds": 0.05, **extra}


def _result(tmp_path, run_id):
    path = tmp_path / "runs" / run_id / layout.RESULT_KEY
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_caption_batch_end_to_end_at_batch_price(tmp_path, fake_api, api_key):
    manifest = _captions(tmp_path, 5)
    result = CliRunner().invoke(cli, ["run", "--pipeline", "caption", "--input", str(manifest), "--output",
                                      str(tmp_path / "runs"), "--api-url", fake_api.url + "/v1", "--model",
                                      "gpt-4o", "--api-mode", "batch", "--batch-poll-seconds", "0.05",
                                      "--rows-per-shard", "3", "--workers", "2", "--run-id", "b"])
    assert result.exit_code == 0, result.output
    rows = _result(tmp_path, "b")
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(5)]
    for i, row in enumerate(rows):  # each answer is traced to its own input
        assert f"Describe picture number {i}" in row["caption"]
    assert fake_api.stats()["batches_created"] == 2  # one batch per shard
    assert not [r for r in fake_api.requests() if r["endpoint"] == "chat.completions"]  # no sync request
    summary = json.loads((tmp_path / "runs/b/summary.json").read_text())
    usage = summary["usage"]
    assert summary["cost_usd"] == pytest.approx(
        (usage["input_tokens"] * 2.5 + usage["output_tokens"] * 10) / 1e6 / 2, abs=1e-6)
    records = [json.loads((tmp_path / f"runs/b/batches/{i:05d}.json").read_text()) for i in range(2)]
    assert [r["status"] for r in records] == ["completed", "completed"] and all(r["mapped"] for r in records)
    status = CliRunner().invoke(cli, ["status", "b", "--output", str(tmp_path / "runs")])
    assert "batch shard 0: batch_" in status.output and "completed (3/3 done, 0 failed)" in status.output


def test_text2image_batch(tmp_path, fake_api, api_key):
    path = tmp_path / "p.jsonl"
    rows = [{"id": f"p{i}", "conversation": [{"from": "human", "value": f"fox {i}"}]} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_local(RunRequest(pipeline="text2image", serving="openai-images", input=str(path),
                                   output=str(tmp_path / "runs"), run_id="t",
                                   options=_options(fake_api, model="gpt-image-1.5")), workers=1)
    assert summary.ok == 3
    rows = _result(tmp_path, "t")
    # Output images are named relative to the run's folder (they resolve wherever it is copied).
    assert all(not os.path.isabs(r["images"][0]) and (tmp_path / "runs/t" / r["images"][0]).exists()
               for r in rows)
    assert fake_api.stats()["batches_created"] == 1


def test_failed_and_expired_lines(tmp_path, fake_api, api_key):
    manifest = _captions(tmp_path, 4)
    fake_api.configure(batch_line_fail=1.0)
    run_local(RunRequest(pipeline="caption", input=str(manifest), output=str(tmp_path / "runs"), run_id="f",
                         options=_options(fake_api)), workers=1)
    errors = [r["error"] for r in _result(tmp_path, "f")]
    assert all(e["type"] == "ServerError" and "fake" in e["message"] for e in errors)
    fake_api.configure(batch_line_fail=0.0, batch_expire=1)
    run_local(RunRequest(pipeline="caption", input=str(manifest), output=str(tmp_path / "runs"), run_id="e",
                         options=_options(fake_api)), workers=1)
    rows = _result(tmp_path, "e")
    assert sum("caption" in r for r in rows) == 2
    missing = [r["error"] for r in rows if "error" in r]
    assert len(missing) == 2
    assert all(e["type"] == "NotProcessed" and "expired" in e["message"] for e in missing)


def test_worker_killed_mid_batch_resumes_without_a_second_batch(tmp_path, fake_api, api_key):
    manifest = _captions(tmp_path, 4)
    fake_api.configure(batch_seconds=4.0)
    storage, spec, _ = prepare_run(RunRequest(pipeline="caption", input=str(manifest),
                                              output=str(tmp_path / "runs"), run_id="k",
                                              options=_options(fake_api)))
    cmd = [sys.executable, "-m", "dfk8s", "worker", "--run", storage.url(), "--index", "0"]
    worker = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if storage.exists(layout.batch_key(0)) and storage.read_json(layout.batch_key(0)).get("batch_id"):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the worker never recorded its batch")
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert fake_api.stats()["batches_created"] == 1
    assert not storage.read_json(layout.batch_key(0))["done"]
    stats = process_shard(open_storage(storage.url()), 0)
    assert stats.ok == 4 and fake_api.stats()["batches_created"] == 1


def test_restart_between_create_and_record_adopts_the_batch(tmp_path, fake_api, api_key):
    import openai

    manifest = _captions(tmp_path, 2)
    storage, spec, _ = prepare_run(RunRequest(pipeline="caption", input=str(manifest),
                                              output=str(tmp_path / "runs"), run_id="a",
                                              options=_options(fake_api)))
    # What a worker killed right after batches.create leaves: the "creating" record, and the batch.
    client = openai.OpenAI(base_url=fake_api.url + "/v1", api_key="x", max_retries=0)
    # custom_id = the row id: its position, as the manifest names no --id-key
    requests = [{"custom_id": str(i), "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": f"q{i}"}]}}
                for i in range(2)]
    lines = "".join(json.dumps(r) + "\n" for r in requests).encode()
    upload = client.files.create(file=("in.jsonl", lines), purpose="batch")
    client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h",
                          metadata={"dfk8s_token": "tok1"})
    client.close()
    storage.write_json(layout.batch_key(0), {"provider": "openai", "token": "tok1", "input_file": upload.id,
                                            "status": "creating", "done": False, "requests": 2,
                                            "created_at": time.time()})
    stats = process_shard(storage, 0)
    assert stats.ok == 2 and fake_api.stats()["batches_created"] == 1
    assert [r["caption"].split(":")[1].split("(")[0].strip() for r in
            (json.loads(line) for line in storage.open_lines(layout.shard_output_key(0)))] == ["q0", "q1"]


def test_shard_over_provider_limits_is_split_at_plan_time(tmp_path, monkeypatch):
    manifest = _captions(tmp_path, 10)  # each row: a ~3 KB PNG as base64 plus its text
    monkeypatch.setattr(batch, "OPENAI_MAX_REQUESTS", 4)
    request = RunRequest(pipeline="caption", input=str(manifest), output=str(tmp_path / "runs"),
                         options={"api_mode": "batch"})
    assert dry_run(request).spec.shards == 3  # 4 + 4 + 2 requests
    size = (tmp_path / "img.png").stat().st_size
    one_row = batch.request_bytes({"row": json.loads(manifest.read_text().splitlines()[0])}, [size])
    monkeypatch.setattr(batch, "OPENAI_MAX_BYTES", 2 * one_row + 10)
    spec = dry_run(request).spec
    assert spec.shards == 5 and spec.rows == 10  # 2 rows per batch file
    request.options = {}
    assert dry_run(request).spec.shards == 1  # sync mode: the usual shard size


def test_batch_mode_refused_where_there_is_no_batch_endpoint(tmp_path, api_key):
    manifest = _captions(tmp_path, 1)
    from dfk8s.errors import SpecError

    with pytest.raises(SpecError, match="not available for imageedit with openai-images"):
        prepare_run(RunRequest(pipeline="imageedit", serving="openai-images", input=str(manifest),
                               output=str(tmp_path / "runs"), options={"api_mode": "batch"}))


def _gemini_rows(tmp_path, edit=False):
    from tests.test_spend import _png

    img = _png(tmp_path / "in.png", (96, 64))
    rows = [{"id": f"g{i}", "conversation": [{"from": "human", "value": f"a {c} owl"}], **(
        {"image": img} if edit else {})} for i, c in enumerate(("green", "red", "blue"))]
    path = tmp_path / ("edit.jsonl" if edit else "gen.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("pipeline", ["text2image", "imageedit"])
def test_gemini_batch_end_to_end(tmp_path, fake_api, monkeypatch, pipeline):
    monkeypatch.setenv("GEMINI_API_KEY", "test-key")
    manifest = _gemini_rows(tmp_path, edit=pipeline == "imageedit")
    summary = run_local(RunRequest(pipeline=pipeline, serving="gemini-images", input=str(manifest),
                                   output=str(tmp_path / "runs"), run_id="g",
                                   options={"api_url": fake_api.url, "api_mode": "batch",
                                            "batch_poll_seconds": 0.05}), workers=1)
    assert summary.ok == 3, summary
    assert fake_api.stats()["gemini_batches_created"] == 1
    assert not [r for r in fake_api.requests() if r["endpoint"] == "gemini.generateContent"]
    out_key = "edited_images" if pipeline == "imageedit" else "images"
    rows = _result(tmp_path, "g")
    assert all((tmp_path / "runs/g" / r[out_key][0]).exists() for r in rows)
    data = json.loads((tmp_path / "runs/g/summary.json").read_text())
    usage = data["usage"]
    assert usage["images"] == 3 and usage["output_image_tokens"] == 3 * 1290
    text_out = usage["output_tokens"] - usage["output_image_tokens"]
    sync = (usage["input_tokens"] * 0.30 + text_out * 2.50 + 3 * 1290 * 30.0) / 1e6
    assert data["cost_usd"] == pytest.approx(sync / 2, abs=1e-6)  # the batch price
    record = json.loads((tmp_path / "runs/g/batches/00000.json").read_text())
    assert record["status"] == "JOB_STATE_SUCCEEDED" and record["batch_id"].startswith("batches/")


def test_gemini_batch_expired_rows_are_not_processed(tmp_path, fake_api, monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", "test-key")
    fake_api.configure(batch_expire=1)
    manifest = _gemini_rows(tmp_path)
    run_local(RunRequest(pipeline="text2image", serving="gemini-images", input=str(manifest),
                         output=str(tmp_path / "runs"), run_id="x",
                         options={"api_url": fake_api.url, "api_mode": "batch", "batch_poll_seconds": 0.05}),
              workers=1)
    errors = [r["error"] for r in _result(tmp_path, "x")]
    assert [e["type"] for e in errors] == ["NotProcessed"] * 3 and "JOB_STATE_EXPIRED" in errors[0]["message"]


def test_cancel_cancels_the_batch_and_keeps_what_completed(tmp_path, fake_api, api_key):
    manifest = _captions(tmp_path, 4)
    fake_api.configure(batch_seconds=30.0)
    storage, spec, _ = prepare_run(RunRequest(pipeline="caption", input=str(manifest),
                                              output=str(tmp_path / "runs"), run_id="c",
                                              options=_options(fake_api)))
    cmd = [sys.executable, "-m", "dfk8s", "worker", "--run", storage.url(), "--index", "0"]
    worker = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if storage.exists(layout.batch_key(0)) and \
                    storage.read_json(layout.batch_key(0)).get("status") == "in_progress":
                break
            time.sleep(0.05)
        result = CliRunner().invoke(cli, ["cancel", "c", "--output", str(tmp_path / "runs")])
        assert "cancelled provider batches batch_" in result.output, result.output
        assert worker.wait(60) == 0  # the worker sees the batch cancelled and maps what it has
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    rows = [json.loads(line) for line in storage.open_lines(layout.shard_output_key(0))]
    assert sum("caption" in r for r in rows) == 2  # what completed before the cancel is kept
    assert [r["error"]["type"] for r in rows if "error" in r] == ["NotProcessed"] * 2
    assert fake_api.stats()["batches_created"] == 1


def test_submit_dry_run_shows_both_prices_and_a_small_batch_pod(s3_bucket):
    import yaml

    from tests.kube.test_submit import NS, caption_args, invoke, pod_spec

    output = f"s3://{s3_bucket}/runs"
    args = caption_args(output, "--dry-run", "--namespace", NS, "--model", "gpt-4o", "--max-tokens", "50")
    sync = invoke(*args)
    batched = invoke(*args, "--api-mode", "batch")
    assert sync.exit_code == 0 and batched.exit_code == 0, batched.output
    for result, mine in ((sync, "sync"), (batched, "batch")):
        assert "prices: dfk8s built-in prices" in result.stderr
        assert f"{mine}" in next(line for line in result.stderr.splitlines() if "<- this run" in line)
    resources = [pod_spec(next(yaml.safe_load_all(r.stdout)))["containers"][0]["resources"]
                 for r in (sync, batched)]
    assert resources[0]["requests"]["cpu"] == "1" and resources[1]["requests"]["cpu"] == "100m"
    assert resources[1]["limits"]["memory"] == "1Gi"


def test_a_planned_batch_run_keeps_its_small_pod_without_the_flag(s3_bucket):
    """run.json's api_mode sizes the pods: a resume without --api-mode batch must not get sync-sized pods."""
    import yaml

    from dfk8s.plan.launch import RunRequest, prepare_run
    from tests.conftest import DATAFLOW_ROOT, VQA_MANIFEST
    from tests.kube.test_submit import NS, caption_args, invoke, pod_spec

    output = f"s3://{s3_bucket}/runs"
    prepare_run(RunRequest(pipeline="caption", input=str(VQA_MANIFEST), image_root=str(DATAFLOW_ROOT),
                           output=output, run_id="planned-batch", rows_per_shard=4,
                           options={"api_mode": "batch", "model": "gpt-4o", "max_tokens": 50}),
                stage_images=True, executor="kubernetes")
    resumed = invoke(*caption_args(output, "--dry-run", "--namespace", NS, "--run-id", "planned-batch"))
    assert resumed.exit_code == 0, resumed.output
    resources = pod_spec(next(yaml.safe_load_all(resumed.stdout)))["containers"][0]["resources"]
    assert resources["requests"]["cpu"] == "100m" and resources["limits"]["memory"] == "1Gi"
