"""The CLI: --help, validate, one-line errors, secrets kept out of output."""

import json
import subprocess
import sys

from click.testing import CliRunner

from dfk8s.cli import cli
from dfk8s.executors.local.pipe import LOG_DIR_ENV
from tests.conftest import DATAFLOW_ROOT, SEED_DOCS, VQA_MANIFEST


def _dfk8s(*args, env=None):
    return subprocess.run([sys.executable, "-m", "dfk8s", *args], capture_output=True, text=True, env=env)


def test_help_lists_commands_and_run_flags():
    out = CliRunner().invoke(cli, ["run", "--help"]).output
    for flag in ("--pipeline", "--input", "--output", "--run-id", "--workers", "--max-concurrency", "--rpm",
                 "--timeout", "--max-retries", "--shards", "--rows-per-shard", "--save-interval", "--steps",
                 "--s3-endpoint", "--id-key", "--image-root", "--shard-retries"):
        assert flag in out, flag
    assert "resumes" in out
    # --model names each serving's default; the group's help names every kind of manifest.
    model_help = " ".join(out[out.index("  --model"):].split("--input-key")[0].split()).replace("- ", "-")
    assert "openai-chat gpt-4o-mini" in model_help and "FLUX.1-Kontext-dev for imageedit" in model_help
    top = " ".join(CliRunner().invoke(cli, ["--help"]).output.split())
    assert "Parquet" in top and "folder of images" in top and "JSONL" in top


def test_validate_reports_every_problem_with_its_element():
    result = CliRunner().invoke(cli, ["validate", "-p", "caption", "-i", str(VQA_MANIFEST),
                                      "--image-root", str(DATAFLOW_ROOT)])
    assert result.exit_code == 1
    # The four rows with the same missing image are one line that names them all.
    lines = [line for line in result.output.splitlines() if "Face.jpg" in line]
    assert len(lines) == 1 and "4 rows: image './static/images/Face.jpg'" in lines[0]
    assert lines[0].endswith("(element 1, element 3, element 5, element 7)")
    assert "4 of 8 rows are good" in result.output


def test_validate_good_manifest_and_bad_jsonl(tmp_path):
    ok = CliRunner().invoke(cli, ["validate", "-p", "imageedit", "-i", str(SEED_DOCS / "imageedit.jsonl")])
    assert ok.exit_code == 0 and "2 of 2 rows are good" in ok.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": [{"role": "user", "content": "x"}]}\nnot json\n{"uid": 1}\n')
    result = CliRunner().invoke(cli, ["validate", "-p", "text2image", "-i", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}: line 2: bad JSON" in result.output
    assert f"{bad}: line 3: missing key 'conversations or conversation'" in result.output


def test_errors_are_one_line_without_traceback(tmp_path):
    result = _dfk8s("run", "-p", "caption", "--serving", "echo", "-i", str(tmp_path / "missing.jsonl"),
                    "-o", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.jsonl'}: no such file"]


def test_missing_api_key_fails_before_planning(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), LOG_DIR_ENV: str(tmp_path / "logs")}
    result = _dfk8s("run", "-p", "caption", "-i", str(VQA_MANIFEST), "-o", str(tmp_path / "o"), env=env)
    assert result.returncode == 42
    assert "missing API key: set DF_API_KEY or OPENAI_API_KEY" in result.stderr
    assert not (tmp_path / "o").exists()


def test_worker_exit_code_42_when_the_shard_cannot_succeed(tmp_path):
    result = _dfk8s("worker", "--run", str(tmp_path / "no-run"), "--index", "0")
    assert result.returncode == 42 and "no run spec" in result.stderr
    missing_index = _dfk8s("worker", "--run", str(tmp_path))
    assert missing_index.returncode == 42 and "JOB_COMPLETION_INDEX" in missing_index.stderr


def test_run_then_reduce_command(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": f"p{i}"}]}) + "\n"
                                for i in range(3)))
    run = CliRunner().invoke(cli, ["run", "-p", "vqa", "--serving", "echo", "-i", str(manifest), "-o",
                                   str(tmp_path), "--run-id", "r1", "--no-progress"])
    assert run.exit_code == 0, run.output
    again = CliRunner().invoke(cli, ["reduce", str(tmp_path / "r1")])
    assert again.exit_code == 0 and "3 rows: 3 ok, 0 failed" in again.output
    assert str(tmp_path / "r1" / "result.jsonl") in again.output


def test_status_of_a_local_run_reads_its_storage_without_a_cluster(tmp_path, monkeypatch):
    from dfk8s.plan.launch import RunRequest, prepare_run
    from dfk8s.worker.shard import process_shard

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))  # no cluster anywhere
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": f"p{i}"}]}) + "\n"
                                for i in range(6)))
    storage, _, _ = prepare_run(RunRequest(pipeline="vqa", serving="echo", input=str(manifest),
                                           output=str(tmp_path), run_id="st", rows_per_shard=2))
    process_shard(storage, 1)
    result = CliRunner().invoke(cli, ["status", "st", "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "progress: 2/6 rows (2 ok, 0 failed); 1/3 shards done (1)" in result.output
    assert f"stopped before its end: resume with `dfk8s run --run-id st -o {tmp_path}`" in result.output
    as_json = json.loads(CliRunner().invoke(cli, ["status", "st", "-o", str(tmp_path), "--json"]).output)
    assert as_json["shards_done"] == [1] and as_json["summary"] is None
