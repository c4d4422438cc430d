"""Caption and VQA on your own model: ``--serving transformers`` (a real `transformers serve`) and vllm's
command line.

The model is a tiny random Qwen2-VL built here (dfk8s.testing.tiny_vlm.py, DESIGN.md's recipe), served by
the real `transformers serve` on the CPU, one engine per worker, started and stopped by dfk8s. vLLM cannot
run here (no GPU, no CPU wheel): its command line is checked against its documented flags.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dfk8s.errors import SpecError
from dfk8s.executors.local.pipe import worker_log_dir
from dfk8s.servings.self_hosted import EngineConfig, engine_arg_flags
from tests.conftest import DATAFLOW_ROOT, VQA_MANIFEST

pytestmark = pytest.mark.xdist_group("tiny-vlm")  # one worker builds the model once
#: Rows of the runs that are interrupted mid-way: enough that the run is still going when the signal lands.
ROWS = 120


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    from dfk8s.testing.tiny_vlm import build_tiny_vlm, size_of

    folder = build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny-qwen2-vl")
    assert size_of(folder) < 2_000_000
    return folder


def _engines_of(model: Path) -> list[int]:
    """Pids of engine processes serving ``model``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in cmdline and str(model).encode() in cmdline:
            found.append(int(proc.name))
    return found


def _dfk8s(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dfk8s", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _run_args(model: Path, output: Path, pipeline="caption", *extra) -> list[str]:
    return ["run", "--pipeline", pipeline, "--serving", "transformers", "--model", str(model),
            "--input", str(VQA_MANIFEST), "--image-root", str(DATAFLOW_ROOT), "--output", str(output),
            "--workers", "1", "--max-tokens", "8", "--no-progress", *extra]


def _result(output: Path) -> list[dict]:
    (run,) = [p for p in output.iterdir() if p.is_dir()]
    return [json.loads(line) for line in (run / "result.jsonl").read_text().splitlines()]


# -- the engine's command lines ------------------------------------------------------------------------

def test_vllm_command_follows_its_documented_cli():
    config = EngineConfig("vllm", "Qwen/Qwen2.5-VL-7B-Instruct", gpus=2, max_model_len=8192,
                          gpu_memory_utilization=0.85, images_per_prompt=1,
                          engine_args=("max-num-seqs=64", "enforce-eager"))
    assert config.command(host="127.0.0.1", port=8000) == [
        "vllm", "serve", "Qwen/Qwen2.5-VL-7B-Instruct", "--host", "127.0.0.1", "--port", "8000",
        "--served-model-name", "Qwen/Qwen2.5-VL-7B-Instruct", "--limit-mm-per-prompt", '{"image": 1}',
        "--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.85", "--max-model-len", "8192",
        "--max-num-seqs", "64", "--enforce-eager"]
    # One GPU: no tensor parallelism flag; vLLM's own memory default.
    one = EngineConfig("vllm", "m", gpus=1).command(host="0.0.0.0", port=8000)
    assert "--tensor-parallel-size" not in one and "--gpu-memory-utilization" not in one


def test_transformers_command_serves_the_model_pinned():
    command = EngineConfig("transformers", "/models/vlm", max_model_len=4096,
                           engine_args=("dtype=float32",)).command(host="127.0.0.1", port=9)
    assert command[1:] == ["serve", "/models/vlm", "--host", "127.0.0.1", "--port", "9",
                           "--max-model-len", "4096", "--dtype", "float32"]
    assert Path(command[0]).name == "transformers"


@pytest.mark.parametrize("bad", ["", "=1", "max num seqs=1"])
def test_a_malformed_engine_arg_is_refused_naming_it(bad):
    with pytest.raises(SpecError, match="--engine-arg"):
        engine_arg_flags([bad])


# -- end to end through transformers serve -------------------------------------------------------------

def test_caption_with_a_model_folder_on_this_machine(tmp_path, tiny_vlm):
    result = _dfk8s(*_run_args(tiny_vlm, tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _result(tmp_path / "out")
    original = json.loads(VQA_MANIFEST.read_text())
    assert len(rows) == len(original) == 8
    for got, want in zip(rows, original, strict=True):
        assert got["conversation"] == want["conversation"]  # DataFlow-MM's row shape, unchanged
        if "Face.jpg" in want["image"][0]:
            assert got["error"]["type"] == "BadRow"
        else:
            assert isinstance(got["caption"], str) and got["caption"].strip() and "error" not in got
    summary = json.loads(next((tmp_path / "out").glob("*/summary.json")).read_text())
    assert summary["ok"] == 4
    assert summary["usage"]["input_tokens"] > 0 and 0 < summary["usage"]["output_tokens"] <= 4 * 8
    # What it cost in compute terms: no GPU here, so per worker-second; the engine's start-up counted once.
    engine = summary["self_hosted"]
    assert (engine["engine"], engine["gpus_per_worker"], engine["rows"], engine["images"]) == (
        "transformers", 0, 4, 4)
    assert engine["engine_startup_seconds"] > 0 and engine["rows_per_worker_second"] > 0
    assert "4 ok, 4 failed" in result.stderr and "output tokens" in result.stderr
    # Its engine is gone with the run, and left its log beside the worker's.
    assert _engines_of(tiny_vlm) == []
    run_id = summary.get("run_id") or next((tmp_path / "out").iterdir()).name
    (engine_log,) = worker_log_dir(run_id).glob("engine-*.log")
    assert "Uvicorn running" in engine_log.read_text()


def test_vqa_answers_each_conversation(tmp_path, tiny_vlm):
    result = _dfk8s(*_run_args(tiny_vlm, tmp_path / "out", "vqa"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _result(tmp_path / "out")
    good = [r for r in rows if "error" not in r]
    assert len(good) == 4
    # Each answered row keeps its conversation and gets the model's text under the output key.
    original = json.loads(VQA_MANIFEST.read_text())
    for row in good:
        assert isinstance(row["answer"], str) and row["answer"].strip(), row
        assert row["conversation"] in [r["conversation"] for r in original]


def test_a_missing_model_is_exit_42_in_one_line(tmp_path):
    result = _dfk8s("run", "--pipeline", "caption", "--serving", "transformers",
                    "--model", str(tmp_path / "no-such-model"), "--input", str(VQA_MANIFEST),
                    "--image-root", str(DATAFLOW_ROOT), "--output", str(tmp_path / "out"), "--workers", "1",
                    "--no-progress")
    assert result.returncode == 42, result.stderr[-3000:]
    assert f"--model {tmp_path / 'no-such-model'} does not exist" in result.stderr
    assert _engines_of(tmp_path / "no-such-model") == []


def test_a_model_the_engine_cannot_load_is_named_with_its_log(tmp_path):
    """A folder that is no model: the engine starts and exits; the error leads with the log's own cause."""
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "README").write_text("weights went elsewhere\n")
    result = _dfk8s("run", "--pipeline", "caption", "--serving", "transformers",
                    "--model", str(tmp_path / "not-a-model"), "--input", str(VQA_MANIFEST),
                    "--image-root", str(DATAFLOW_ROOT), "--output", str(tmp_path / "out"), "--workers", "1",
                    "--no-progress", "--shard-retries", "0")
    assert result.returncode == 42, result.stderr[-3000:]  # every attempt would fail the same way
    assert "engine exited" in result.stderr and "last log lines: " in result.stderr
    cause = result.stderr.split("last log lines: ", 1)[1].split(" | ")[0]
    assert cause.startswith("ValueError: Unrecognized model in"), cause
    assert _engines_of(tmp_path / "not-a-model") == []


def test_a_flag_the_engine_refuses_is_exit_42(tmp_path, tiny_vlm):
    result = _dfk8s(*_run_args(tiny_vlm, tmp_path / "out", "caption", "--engine-arg", "no-such-flag=1"))
    assert result.returncode == 42, result.stderr[-3000:]
    assert "no-such-flag" in result.stderr or "No such option" in result.stderr
    assert _engines_of(tiny_vlm) == []


def test_an_engine_that_never_becomes_ready_fails_after_the_stated_timeout(tmp_path, tiny_vlm):
    began = time.monotonic()
    result = _dfk8s(*_run_args(tiny_vlm, tmp_path / "out", "caption", "--engine-timeout", "1",
                               "--shard-retries", "0"))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "not ready after 1s (--engine-timeout)" in result.stderr
    assert time.monotonic() - began < 120
    assert _engines_of(tiny_vlm) == []


@pytest.mark.timeout(900)  # two engine start-ups on a loaded 2-core machine
def test_engine_killed_mid_shard_is_restarted_once_and_the_shard_goes_on(tmp_path, tiny_vlm):
    """SIGKILL the engine while rows are in flight: the worker restarts it, every good row is captioned."""
    returncode, err = _signal_the_engine_mid_run(tiny_vlm, tmp_path, ROWS, signal.SIGKILL)
    assert returncode == 0, err[-3000:]
    rows = _result(tmp_path / "out")
    assert len(rows) == ROWS and all("error" not in r and r["caption"].strip() for r in rows)
    run_id = next((tmp_path / "out").iterdir()).name
    worker_log = "".join(p.read_text() for p in worker_log_dir(run_id).glob("worker-*.log"))
    assert "mid-shard: restarting it once" in worker_log
    assert _engines_of(tiny_vlm) == []


def _many_rows(tmp_path: Path, count: int) -> Path:
    manifest = tmp_path / "many.jsonl"
    image = DATAFLOW_ROOT / json.loads(VQA_MANIFEST.read_text())[1]["image"][0]
    manifest.write_text("".join(json.dumps({"image": [str(image)], "conversation": [
        {"from": "human", "value": f"<image>\nDescribe picture {i}."}]}) + "\n" for i in range(count)))
    return manifest


def _wait_for_engine_serving(tiny_vlm: Path, output: Path, timeout: float = 300) -> int:
    """The pid of the engine once it has answered a row."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        engines = _engines_of(tiny_vlm)
        served = [*output.glob("*/progress/*"), *output.glob("*/parts/*"),
                  *output.glob("*/output/*.done.json")]
        if engines and served:
            return engines[0]
        time.sleep(0.2)
    raise AssertionError("the engine never served a row")


def _signal_the_engine_mid_run(tiny_vlm: Path, tmp_path: Path, rows: int, sig: int, *extra: str):
    """Caption ``rows`` rows; send ``sig`` to the engine once it has answered. (exit code, stderr)"""
    args = _run_args(tiny_vlm, tmp_path / "out", "caption", "--max-concurrency", "2", *extra)
    args[args.index("--input") + 1] = str(_many_rows(tmp_path, rows))
    args[args.index("--max-tokens") + 1] = "48"  # slow enough that the signal lands mid-run
    proc = subprocess.Popen([sys.executable, "-m", "dfk8s", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        os.kill(_wait_for_engine_serving(tiny_vlm, tmp_path / "out"), sig)
        _, err = proc.communicate(timeout=600)  # a loaded machine (make test runs beside it) is slow
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


@pytest.mark.timeout(900)  # two engine start-ups on a loaded 2-core machine
def test_a_hung_engine_is_stopped_and_the_shard_retried(tmp_path, tiny_vlm):
    """SIGSTOP the engine (it hangs, rows in flight): after --engine-hang-seconds the worker stops it, the
    shard is retried on a fresh engine, and the run completes; the worker never hangs with it."""
    returncode, err = _signal_the_engine_mid_run(tiny_vlm, tmp_path, ROWS, signal.SIGSTOP,
                                                 "--engine-hang-seconds", "10", "--save-interval", "1")
    assert returncode == 0, err[-3000:]
    rows = _result(tmp_path / "out")
    assert len(rows) == ROWS and all("error" not in r for r in rows)
    assert "answered nothing for 10s" in err
    assert _engines_of(tiny_vlm) == []


@pytest.mark.timeout(900)  # two engine start-ups on a loaded 2-core machine
def test_kill_9_of_the_launcher_stops_the_engine_and_the_resume_finishes(tmp_path, tiny_vlm):
    args = _run_args(tiny_vlm, tmp_path / "out", "caption", "--max-concurrency", "2", "--save-interval", "1")
    args[args.index("--input") + 1] = str(_many_rows(tmp_path, ROWS))
    args[args.index("--max-tokens") + 1] = "48"
    proc = subprocess.Popen([sys.executable, "-m", "dfk8s", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_for_engine_serving(tiny_vlm, tmp_path / "out")
        proc.kill()
    finally:
        proc.wait()
    deadline = time.monotonic() + 60  # the worker sees its launcher gone, checkpoints, stops its engine
    while _engines_of(tiny_vlm) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _engines_of(tiny_vlm) == []
    run_id = next((tmp_path / "out").iterdir()).name
    resumed = _dfk8s("run", "--run-id", run_id, "--output", str(tmp_path / "out"), "--workers", "1",
                     "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = _result(tmp_path / "out")
    assert len(rows) == ROWS and all("error" not in r for r in rows)
    assert len({r["conversation"][0]["value"] for r in rows}) == ROWS  # each row exactly once
    assert _engines_of(tiny_vlm) == []


# -- dfk8s model pull for a VLM ------------------------------------------------------------------------

QWEN_VL_LISTING = [  # Qwen/Qwen2.5-VL-7B-Instruct as the Hub lists it (weights in 5 shards)
    ".gitattributes", "README.md", "chat_template.json", "config.json", "generation_config.json",
    "merges.txt", "model-00001-of-00005.safetensors", "model-00002-of-00005.safetensors",
    "model-00003-of-00005.safetensors", "model-00004-of-00005.safetensors",
    "model-00005-of-00005.safetensors", "model.safetensors.index.json", "preprocessor_config.json",
    "tokenizer.json", "tokenizer_config.json", "vocab.json",
]


def test_model_pull_picks_what_the_engines_load_of_a_vlm():
    from dfk8s.models.hub import select_model_files

    selected = select_model_files(QWEN_VL_LISTING + ["pytorch_model.bin", "original/model.pth", "q4.gguf"])
    assert selected == sorted(set(QWEN_VL_LISTING) - {".gitattributes", "README.md"})
    with pytest.raises(SpecError, match="no weights transformers loads"):
        select_model_files(["config.json", "weights/consolidated.pth"])


def test_model_pull_of_a_vlm_then_caption_offline_by_its_hub_name(tmp_path, tiny_vlm):
    """`dfk8s model pull` fetches the VLM's files once into the cache layout; the engine loads it by name,
    offline, from that cache (as pods do from the model-cache PVC)."""
    from tests.helpers.fake_hub import FakeHub

    repo = tmp_path / "repo"
    repo.mkdir()
    for path in tiny_vlm.iterdir():
        (repo / path.name).write_bytes(path.read_bytes())
    (repo / "pytorch_model.bin").write_bytes(b"a second copy of the weights\n" * 100)  # never fetched
    (repo / "README.md").write_text("# tiny\n")
    cache = tmp_path / "hf"
    with FakeHub({"tiny-org/tiny-vlm": repo}) as hub:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
        pulled = subprocess.run([sys.executable, "-m", "dfk8s", "model", "pull", "tiny-org/tiny-vlm", "--to",
                                 str(cache)], capture_output=True, text=True, timeout=120, env=env)
        assert pulled.returncode == 0, pulled.stderr[-3000:]
        fetched = {r.path for r in hub.requests if r.method == "GET"}
    assert fetched == {p.name for p in tiny_vlm.iterdir()}
    listed = _dfk8s("model", "list", "--dir", str(cache), "--json")
    (entry,) = json.loads(listed.stdout)["dfk8s_models"]
    assert entry["model"] == "tiny-org/tiny-vlm" and entry["complete"] is True

    args = _run_args(tiny_vlm, tmp_path / "out")
    args[args.index("--model") + 1] = "tiny-org/tiny-vlm"
    result = _dfk8s(*args, env={"HF_HOME": str(cache), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert sum("error" not in r for r in _result(tmp_path / "out")) == 4
