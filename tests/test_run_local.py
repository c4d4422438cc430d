"""The data path end to end with the instant echo serving: plan, worker, resume, reduce, on disk and S3."""

import json
import os

import pytest

from dfk8s.errors import ShardError, SpecError
from dfk8s.executors.local.launch import run_local
from dfk8s.plan.launch import RunRequest, prepare_run
from dfk8s.reduce.reducer import reduce_run
from dfk8s.run import layout
from dfk8s.storage import open_storage
from dfk8s.worker.shard import process_shard, read_parts
from tests.conftest import DATAFLOW_ROOT, SEED_DOCS, VQA_MANIFEST


def _lines(storage, key):
    return [json.loads(line) for line in storage.open_lines(key)]


def _manifest(tmp_path, n, *, bad_every=0, name="m.jsonl"):
    path = tmp_path / name
    with path.open("w") as f:
        for i in range(n):
            text = f"prompt {i}" + (" FAIL" if bad_every and i % bad_every == 0 else "")
            f.write(json.dumps({"uid": f"r{i}", "conversations": [{"role": "user", "content": text}]}) + "\n")
    return path


def test_vqa_fixture_keeps_all_eight_rows_in_order_with_face_errors(tmp_path):
    summary = run_local(RunRequest(pipeline="caption", serving="echo", input=str(VQA_MANIFEST),
                                   output=str(tmp_path), image_root=str(DATAFLOW_ROOT), rows_per_shard=3,
                                   run_id="vqa"), workers=2)
    storage = open_storage(str(tmp_path / "vqa"))
    result = _lines(storage, layout.RESULT_KEY)
    original = json.loads(VQA_MANIFEST.read_text())
    assert len(result) == 8 and summary.rows == 8 and summary.shards == 3
    for got, want in zip(result, original, strict=True):
        assert got["conversation"] == want["conversation"]
        # A good row's image path resolves from anywhere; a row whose image is missing keeps its own.
        if "Face.jpg" in want["image"][0]:
            assert got["image"] == [want["image"][0]]
        else:  # the same file, whether or not the fixtures' folder is reached through a symlink
            assert got["image"][0].startswith("/")
            assert os.path.realpath(got["image"][0]) == os.path.realpath(DATAFLOW_ROOT / want["image"][0])
        if "Face.jpg" in want["image"][0]:
            assert "caption" not in got and got["error"]["type"] == "BadRow"
            assert "Face.jpg" in got["error"]["message"] and "not found" in got["error"]["message"]
        else:
            assert got["caption"].startswith("echo: ") and "error" not in got
    errors = _lines(storage, layout.ERRORS_KEY)
    assert [e["pos"] for e in errors] == [0, 2, 4, 6]
    assert summary.ok == 4 and summary.failed == 4 and summary.complete


def test_seed_docs_caption_fixture_with_relative_paths(tmp_path):
    summary = run_local(RunRequest(pipeline="caption", serving="echo", input=str(SEED_DOCS / "caption.json"),
                                   output=str(tmp_path), run_id="c"), workers=1)
    assert summary.ok == 2 and summary.failed == 0


def test_bad_rows_become_error_records_and_nothing_is_lost(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"conversations": [{"role": "user", "content": "ok"}]}\n{oops\n{"prompt": "no conv"}\n'
                    '{"conversations": [{"role": "user", "content": "ok2"}]}\n')
    summary = run_local(RunRequest(pipeline="text2image", serving="echo", input=str(path),
                                   output=str(tmp_path / "out"), run_id="r"), workers=1)
    storage = open_storage(str(tmp_path / "out/r"))
    result = _lines(storage, layout.RESULT_KEY)
    assert len(result) == 4 and summary.failed == 2
    assert result[1]["error"]["raw"] == "{oops" and "line 2" in result[1]["error"]["message"]
    assert "line 3" in result[2]["error"]["message"] and "missing key" in result[2]["error"]["message"]
    assert result[0]["images"] == ["images/0/0.png"]  # relative to the run's folder
    assert storage.exists("images/3/0.png") and not storage.exists("images/1/0.png")


def test_duplicate_ids_are_reported_and_kept(tmp_path):
    path = tmp_path / "m.jsonl"
    row = {"uid": "same", "conversations": [{"role": "user", "content": "x"}]}
    path.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    summary = run_local(RunRequest(pipeline="text2image", serving="echo", input=str(path), id_key="uid",
                                   output=str(tmp_path / "o"), run_id="d"), workers=1)
    assert summary.ok == 1 and summary.failed == 1
    errors = _lines(open_storage(str(tmp_path / "o/d")), layout.ERRORS_KEY)
    assert "duplicate id 'same'" in errors[0]["error"]["message"]


def test_worker_resumes_from_parts_without_redoing_rows(tmp_path):
    manifest = _manifest(tmp_path, 25)
    request = RunRequest(pipeline="vqa", serving="echo", input=str(manifest), output=str(tmp_path / "o"),
                         run_id="res", save_interval=5, rows_per_shard=25)
    storage, spec, resumed = prepare_run(request)
    assert not resumed
    # A previous attempt finished rows 0-4 and 10-14 (parts), then died.
    storage.write_bytes(layout.part_key(0, 0), b"".join(
        json.dumps({"pos": p, "id": str(p), "ok": True, "row": {"answer": "from-part"}}).encode() + b"\n"
        for p in [*range(5), *range(10, 15)]))
    stats = process_shard(storage, 0)
    assert stats.rows == 25 and stats.resumed_rows == 10
    out = _lines(storage, layout.shard_output_key(0))
    assert [r["answer"] for r in out[:5]] == ["from-part"] * 5
    assert out[5]["answer"] == "echo: prompt 5" and out[12]["answer"] == "from-part"
    assert read_parts(storage, 0) == ({}, 0)  # parts are removed once the output holds them
    assert process_shard(storage, 0).rows == 25  # done marker: a second run does nothing


def test_resume_with_run_id_reuses_the_plan(tmp_path):
    manifest = _manifest(tmp_path, 5)
    request = RunRequest(pipeline="vqa", serving="echo", input=str(manifest), output=str(tmp_path),
                         run_id="x")
    run_local(request, workers=1)
    again = RunRequest(pipeline="vqa", output=str(tmp_path), run_id="x")  # no --input needed
    storage, spec, resumed = prepare_run(again)
    assert resumed and spec.rows == 5 and spec.serving == "echo"
    with pytest.raises(SpecError, match="is a vqa run"):
        prepare_run(RunRequest(pipeline="caption", output=str(tmp_path), run_id="x"))
    other = _manifest(tmp_path, 3, name="other.jsonl")
    with pytest.raises(SpecError, match="was planned from .*m.jsonl, not .*other.jsonl"):
        prepare_run(RunRequest(pipeline="vqa", input=str(other), output=str(tmp_path), run_id="x"))
    # The same manifest named another way resumes.
    assert prepare_run(RunRequest(pipeline="vqa", input=f"{tmp_path}/./m.jsonl", output=str(tmp_path),
                                  run_id="x"))[2]


def test_unfinished_shard_is_named_and_its_rows_marked(tmp_path):
    manifest = _manifest(tmp_path, 6)
    storage, spec, _ = prepare_run(RunRequest(pipeline="vqa", serving="echo", input=str(manifest),
                                              output=str(tmp_path), run_id="u", rows_per_shard=2))
    process_shard(storage, 0)
    process_shard(storage, 2)
    summary = reduce_run(storage)
    result = _lines(storage, layout.RESULT_KEY)
    assert [r["conversations"][0]["content"] for r in result] == [f"prompt {i}" for i in range(6)]
    assert summary.failed_shards == [1] and summary.not_processed == 2 and not summary.complete
    assert result[2]["error"]["type"] == "NotProcessed" and result[3]["error"]["shard"] == 1
    assert json.loads(storage.read_bytes(layout.SUMMARY_KEY))["failed_shards"] == [1]


def test_bad_shard_index_and_missing_spec_cannot_succeed(tmp_path):
    manifest = _manifest(tmp_path, 2)
    storage, _, _ = prepare_run(RunRequest(pipeline="vqa", serving="echo", input=str(manifest),
                                           output=str(tmp_path), run_id="b"))
    with pytest.raises(ShardError):
        process_shard(storage, 5)
    with pytest.raises(SpecError):
        process_shard(open_storage(str(tmp_path / "nothing")), 0)


def test_run_on_s3_end_to_end(tmp_path, s3_bucket):
    manifest = _manifest(tmp_path, 30, bad_every=7)
    output = f"s3://{s3_bucket}/runs"
    summary = run_local(RunRequest(pipeline="text2image", serving="echo", input=str(manifest), output=output,
                                   run_id="s3run", rows_per_shard=8, options={"fail_marker": "FAIL"}),
                        workers=2)
    storage = open_storage(output).child("s3run")
    result = _lines(storage, layout.RESULT_KEY)
    assert [r["uid"] for r in result] == [f"r{i}" for i in range(30)]
    assert summary.failed == 5 and summary.ok == 25 and summary.shards == 4
    assert result[1]["images"] == [f"s3://{s3_bucket}/runs/s3run/images/1/0.png"]
    assert result[0]["error"]["type"] == "EchoFailure"
    assert storage.exists("images/1/0.png") and not storage.exists("images/0/0.png")
    assert not list(storage.list("parts"))


def test_manifest_and_images_on_s3_are_staged_for_cluster_runs(tmp_path, s3_bucket):
    bucket = open_storage(f"s3://{s3_bucket}")
    bucket.write_bytes("in/m.jsonl", (SEED_DOCS / "imageedit.jsonl").read_bytes())
    storage, spec, _ = prepare_run(
        RunRequest(pipeline="imageedit", serving="echo", input=f"s3://{s3_bucket}/in/m.jsonl",
                   output=f"s3://{s3_bucket}/runs", run_id="st", image_root=str(SEED_DOCS)),
        stage_images=True)
    shard = _lines(storage, layout.shard_input_key(0))
    assert all(r["images"][0].startswith("run:staged/") for r in shard)
    staged = list(storage.list("staged"))
    assert len(staged) == 2 and all(k.endswith(".png") for k in staged)
    stats = process_shard(storage, 0)
    assert stats.ok == 2


def test_a_serving_that_is_down_stops_the_shard_for_a_retry_instead_of_failing_rows(tmp_path):
    from dfk8s.errors import ServingUnavailable
    from dfk8s.servings.base import Serving

    class Down(Serving):
        concurrency = 2

        @classmethod
        def from_spec(cls, spec):
            return cls()

        async def run(self, batch):
            raise ServingUnavailable("model download failed: connection reset")

    manifest = _manifest(tmp_path, 6)
    storage, _, _ = prepare_run(RunRequest(pipeline="vqa", serving="echo", input=str(manifest),
                                           output=str(tmp_path), run_id="down", save_interval=1))
    with pytest.raises(ServingUnavailable):
        process_shard(storage, 0, serving=Down())
    assert read_parts(storage, 0)[0] == {}  # no row was marked failed
    assert process_shard(storage, 0).ok == 6  # the retry (here: the echo serving) does them all


def test_local_workers_get_their_own_gpus():
    from dfk8s.executors.local.executor import split_gpus

    assert split_gpus(["0", "1", "2", "3"], 2) == ["0,2", "1,3"]
    assert split_gpus(["0", "1"], 4) == ["0", "1"]


def test_relative_images_of_a_manifest_on_s3_are_read_beside_it(tmp_path, s3_bucket):
    bucket = open_storage(f"s3://{s3_bucket}")
    png = (DATAFLOW_ROOT / "dataflow/example/vqa/ggbond.png").read_bytes()
    bucket.write_bytes("data/img/a.png", png)
    row = {"image": "img/a.png", "conversation": [{"from": "human", "value": "<image>\nwhat?"}]}
    bucket.write_bytes("data/m.jsonl", json.dumps(row).encode() + b"\n")
    summary = run_local(RunRequest(pipeline="caption", serving="echo", input=f"s3://{s3_bucket}/data/m.jsonl",
                                   output=str(tmp_path), run_id="s3rel"), workers=1)
    assert summary.ok == 1
    shard = _lines(open_storage(str(tmp_path / "s3rel")), layout.shard_input_key(0))
    assert shard[0]["images"] == [f"s3://{s3_bucket}/data/img/a.png"]


def test_a_local_write_survives_a_concurrent_delete_that_empties_its_folder(tmp_path):
    """Workers of one run write parts in sibling folders while others delete theirs; a delete removes the
    folders it empties (like S3), which raced a write's mkdir: 'cannot write parts/00021/000000.jsonl: No
    such file or directory', the shard failed and its rows were sent again (`dfk8s run`, 100 shards)."""
    import sys
    import threading

    from dfk8s.errors import StorageError

    storage = open_storage(str(tmp_path / "run"))
    failures = []

    def writer(name):
        for i in range(1500):
            key = f"parts/{name}{i % 7}/000000.jsonl"
            try:
                storage.write_bytes(key, b"{}\n")
            except StorageError as exc:
                failures.append(str(exc))
            storage.delete(key)

    threads = [threading.Thread(target=writer, args=(name,)) for name in "abcd"]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between any two steps, as processes may
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert failures == []
    assert not (tmp_path / "run" / "parts").exists()  # every folder the deletes emptied is gone


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_a_runs_files_follow_the_umask(tmp_path, umask):
    # result.jsonl, the images, report.html and its thumbnails hold no secret: teammates and a web
    # server read them as the umask allows (they were 0600 whatever the umask).
    import subprocess
    import sys

    manifest = _manifest(tmp_path, 3)
    script = (f"import os, sys; os.umask({umask}); from dfk8s.cli import main; "
              "sys.argv = ['dfk8s'] + sys.argv[1:]; main()")
    result = subprocess.run([sys.executable, "-c", script, "run", "-p", "text2image", "--serving", "echo",
                             "-i", str(manifest), "-o", str(tmp_path / "o"), "--run-id", "u",
                             "--workers", "1", "--report", "--no-progress"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "o" / "u"
    files = [run / "result.jsonl", run / "summary.json", run / "report.html",
             *run.glob("images/*/*.png"), *run.glob("report/thumbs/*")]
    assert len(files) >= 3 + 3 + 1
    want = 0o666 & ~umask
    assert {str(f.relative_to(run)): oct(f.stat().st_mode & 0o777) for f in files} == \
        {str(f.relative_to(run)): oct(want) for f in files}
