"""FLUX's fast path, lossy options and compile cache, on tiny real pipelines with real compilation (CPU)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("sentencepiece")
pytest.importorskip("torch")

from dfk8s.errors import SpecError  # noqa: E402
from dfk8s.servings import flux_speed  # noqa: E402
from dfk8s.servings.flux_speed import CompileCache, Speed  # noqa: E402
from tests.conftest import FIXTURES  # noqa: E402
from tests.test_diffusers_serving import (  # noqa: E402
    PROMPTS,
    assert_same_image,
    req,
    serving_for,
    small_png,
)

SEED_DOCS = FIXTURES / "seed-docs"
KEY = {"format": 1, "device": "cpu-x86_64", "torch": "2.13.0", "shapes": {"height": 64}}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ----- the compile cache, as a unit -------------------------------------------------------------------


def test_a_published_cache_reads_back_whole(tmp_path):
    cache = CompileCache(tmp_path / "cc", KEY)
    assert cache.read() is None
    assert cache.publish(b"artifacts" * 1000)
    assert cache.read() == b"artifacts" * 1000
    assert [p.name for p in (tmp_path / "cc").iterdir()] == [cache.path.name]  # no .partial left behind
    assert CompileCache(tmp_path / "cc", {**KEY, "torch": "2.14.0"}).path != cache.path


@pytest.mark.parametrize("damage", ["torn", "flipped", "other key", "header only", "not json"])
def test_a_damaged_or_foreign_cache_file_is_never_read(tmp_path, damage):
    cache = CompileCache(tmp_path, KEY)
    assert cache.publish(b"0123456789" * 100)
    data = cache.path.read_bytes()
    header, body = data.split(b"\n", 1)
    if damage == "torn":
        cache.path.write_bytes(data[: len(data) - 7])
    elif damage == "flipped":
        cache.path.write_bytes(header + b"\n" + body[:50] + bytes([body[50] ^ 1]) + body[51:])
    elif damage == "other key":
        other = CompileCache(tmp_path / "other", {**KEY, "device": "NVIDIA H100 80GB HBM3"})
        other.publish(body)
        cache.path.write_bytes(other.path.read_bytes())
    elif damage == "header only":
        cache.path.write_bytes(header)
    else:
        cache.path.write_bytes(b"\x00" * 64)
    assert cache.read() is None


def test_a_half_written_file_is_ignored(tmp_path):
    cache = CompileCache(tmp_path, KEY)
    (tmp_path / (cache.path.name + ".x1y2.partial")).write_bytes(b"half of")
    assert cache.read() is None
    assert cache.publish(b"whole")
    assert cache.read() == b"whole"


def test_a_folder_that_cannot_be_written_costs_a_compile_not_the_shard(tmp_path, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    cache = CompileCache(blocked / "compile", KEY)
    assert cache.publish(b"artifacts") is False
    assert "cannot publish" in caplog.text


def test_the_key_names_what_compiled_code_depends_on(tiny_models):
    serving = serving_for("text2image", tiny_models["flux"], compile=True)
    pipe = serving.load()[0]
    key = flux_speed.cache_key(pipe=pipe, device="cpu", dtype="float32", speed=serving.speed,
                               shapes=serving._shapes())
    assert {"device", "torch", "cuda", "diffusers", "dfk8s", "pipeline", "transformer", "dtype", "speed",
            "shapes"} <= set(key)
    assert key["pipeline"] == "FluxPipeline"
    assert key["shapes"]["height"] == 64 and key["shapes"]["batch_size"] == 4
    other = flux_speed.cache_key(pipe=pipe, device="cpu", dtype="float32", speed=Speed(compile=True,
                                 step_cache=0.2), shapes=serving._shapes())
    assert CompileCache(Path("/x"), key).path != CompileCache(Path("/x"), other).path


# ----- options -----------------------------------------------------------------------------------------


def test_compile_defaults_on_with_cuda_and_off_on_a_cpu():
    assert flux_speed.compile_default(None, "cuda:0") is True
    assert flux_speed.compile_default(None, "cpu") is False
    assert flux_speed.compile_default(False, "cuda:0") is False
    assert flux_speed.compile_default(True, "cpu") is True


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, "fast"])
def test_a_bad_step_cache_threshold_is_refused(bad):
    with pytest.raises(SpecError, match="step_cache"):
        flux_speed.check_step_cache(bad)


def test_fp8_is_refused_in_one_line_where_no_gpu_runs_it(tmp_path):
    out = tmp_path / "runs"
    result = subprocess.run(
        [sys.executable, "-m", "dfk8s", "run", "-p", "text2image", "--serving", "diffusers", "--model",
         str(tmp_path / "model"), "--input", str(SEED_DOCS / "text2image.jsonl"), "--output", str(out),
         "--fp8"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--fp8 needs" in lines[0] and "compute capability 8.9" in lines[0], lines
    assert not out.exists() or not any(out.iterdir())  # nothing planned


# ----- the fast path on the tiny pipelines --------------------------------------------------------------


def test_the_compiled_path_gives_the_eager_images_and_publishes_over_a_half_written_cache(
        tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv(flux_speed.CACHE_ENV, str(tmp_path / "cc"))
    # This process's inductor cache on a folder of its own, as a new pod's (inductor reads it per lookup).
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    batch = [req(*p) for p in PROMPTS]
    eager = asyncio.run(serving_for("text2image", tiny_models["flux"], compile=False).run(batch))
    fast = serving_for("text2image", tiny_models["flux"], compile=True)
    assert fast.speed.compile and fast.speed.exact
    # A pod that died while publishing left this; it must be neither read nor in the way.
    (tmp_path / "cc").mkdir()
    (tmp_path / "cc" / "flux-0123.torchcache.abc.partial").write_bytes(b"torn")
    notes = []
    original = flux_speed.Compiled.after_call

    def after_call(self):
        notes.append(self.note)  # the progress's note while the first call ran
        original(self)

    monkeypatch.setattr(flux_speed.Compiled, "after_call", after_call)
    compiled = asyncio.run(fast.run(batch))
    for a, b in zip(eager, compiled, strict=True):
        assert_same_image(a.images[0], b.images[0])
    assert notes[0].startswith("compiling FLUX (first worker on cpu-") and "about 1 min" in notes[0]
    assert fast.status_note is None  # cleared once the first call is done
    report = fast.speed_report()
    assert report["worker"] == "compiled" and report["graphs_compiled"] > 0 and report["exact"] is True
    assert "worker" not in fast.speed_report()  # a worker's compile counts once, in its first shard
    published = [p for p in (tmp_path / "cc").iterdir() if p.name.endswith(".torchcache")]
    assert len(published) == 1 and fast._compiled.cache.read() is not None


def _run(tmp_path: Path, name: str, monkeypatch, *, pipeline="text2image", **options):
    """One whole local run; its worker is a fresh process with an empty inductor cache of its own."""
    from dfk8s.executors.local.launch import run_local
    from dfk8s.plan.launch import RunRequest

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / f"inductor-{name}"))
    manifest = "text2image.jsonl" if pipeline == "text2image" else "imageedit.jsonl"
    request = RunRequest(pipeline=pipeline, output=str(tmp_path / "runs"), run_id=name,
                         input=str(SEED_DOCS / manifest), serving="diffusers", options=options)
    summary = run_local(request, workers=1)
    assert summary.ok == summary.rows > 0, summary
    run_dir = tmp_path / "runs" / name
    return summary, sorted(p.read_bytes() for p in (run_dir / "images").rglob("*.png"))


def test_the_second_worker_starts_from_the_compile_cache_without_compiling(tiny_models, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setenv(flux_speed.CACHE_ENV, str(tmp_path / "cc"))
    tiny = {"model": str(tiny_models["flux"]), "steps": 2, "height": 64, "width": 64, "dtype": "float32"}
    eager, eager_images = _run(tmp_path, "eager", monkeypatch, **tiny)
    assert eager.flux == {"compile": False, "step_cache": None, "fp8": False, "exact": True}
    first, first_images = _run(tmp_path, "first", monkeypatch, compile=True, **tiny)
    assert first.flux["workers_compiled"] == 1 and "workers_from_cache" not in first.flux
    assert first.flux["graphs_compiled"] > 0
    assert len(list((tmp_path / "cc").glob("*.torchcache"))) == 1
    second, second_images = _run(tmp_path, "second", monkeypatch, compile=True, **tiny)
    assert second.flux["workers_from_cache"] == 1 and "workers_compiled" not in second.flux
    assert second.flux["graphs_compiled"] == 0 and second.flux["graphs_loaded"] > 0, second.flux
    assert len(list((tmp_path / "cc").glob("*.torchcache"))) == 1  # a worker that loaded publishes nothing
    for a, b, c in zip(eager_images, first_images, second_images, strict=True):
        assert_same_image(a, b)
        assert b == c  # the same compiled kernels
    spec = json.loads((tmp_path / "runs" / "second" / "run.json").read_text())
    assert spec["options"]["compile"] is True


# ----- the lossy options ---------------------------------------------------------------------------------


def test_the_step_cache_is_applied_recorded_and_tagged(tiny_models, tmp_path, monkeypatch):
    tiny = {"model": str(tiny_models["flux"]), "steps": 6, "height": 64, "width": 64, "dtype": "float32"}
    _, exact_images = _run(tmp_path, "exact", monkeypatch, **tiny)
    cached, cached_images = _run(tmp_path, "cached", monkeypatch, step_cache=0.9, **tiny)
    assert cached.flux["step_cache"] == 0.9 and cached.flux["exact"] is False
    spec = json.loads((tmp_path / "runs" / "cached" / "run.json").read_text())
    assert spec["options"]["step_cache"] == 0.9
    assert cached_images != exact_images  # steps were skipped: not the exact images
    assert "lossy: step cache 0.9" in _report_html(tmp_path / "runs" / "cached")
    assert "lossy:" not in _report_html(tmp_path / "runs" / "exact")


def _report_html(run_dir: Path) -> str:
    from dfk8s.report import write_report
    from dfk8s.storage import open_storage

    write_report(open_storage(str(run_dir)))
    return (run_dir / "report.html").read_text()


def test_the_step_cache_runs_on_kontext_too(tiny_models):
    """FluxKontextPipeline opens no cache context itself; without the serving's, every row fails."""
    serving = serving_for("imageedit", tiny_models["kontext"], steps=4, step_cache=0.5)
    results = asyncio.run(serving.run([req("k0", "make it blue", 5, [small_png()]),
                                       req("k1", "add a hat", 6, [small_png()])]))
    assert [type(r).__name__ for r in results] == ["Response", "Response"], results
    assert serving.speed_report()["exact"] is False


# ----- the progress says what a first worker is doing ------------------------------------------------------


def test_the_progress_shows_the_compile_note_instead_of_a_silent_stall(tmp_path):
    from dfk8s.run import layout
    from dfk8s.run.progress import ProgressReader, describe_facts, progress_facts
    from dfk8s.storage import open_storage

    storage = open_storage(str(tmp_path / "run"))
    note = "compiling FLUX (first worker on NVIDIA H100 80GB HBM3 with these shapes; about 1 min)"
    storage.write_json(layout.progress_key(0), {"shard": 0, "rows": 10, "done": 0, "ok": 0, "failed": 0,
                                                 "note": note})
    storage.write_json(layout.progress_key(1), {"shard": 1, "rows": 10, "done": 3, "ok": 3, "failed": 0,
                                                 "note": note})
    storage.write_json(layout.progress_key(2), {"shard": 2, "rows": 10, "done": 4, "ok": 4, "failed": 0})
    progress = ProgressReader(storage).poll()
    assert progress.notes == (note,) and progress.rows == 7
    line = describe_facts(progress_facts(7, 30, 7, 0, None, note=progress.notes[0]))
    assert line.endswith("; " + note)


def test_a_worker_publishes_its_servings_note_in_the_live_progress(tmp_path):
    from dfk8s.run import layout
    from dfk8s.run.spec import RunSpec
    from dfk8s.storage import open_storage
    from dfk8s.worker.shard import ShardRunner

    class Compiling:
        status_note = "compiling FLUX (first worker on cpu-x86_64 with these shapes; about 1 min)"
        concurrency = 1

    storage = open_storage(str(tmp_path / "run"))
    spec = RunSpec(run_id="note", pipeline="text2image", serving="diffusers", options={})
    runner = ShardRunner(spec, storage, 3, Compiling())
    runner.rows = 5
    runner.publish_progress()
    assert storage.read_json(layout.progress_key(3))["note"] == Compiling.status_note
    Compiling.status_note = None  # the first call is done: the note goes, the counts stay
    runner.publish_progress()
    live = storage.read_json(layout.progress_key(3))
    assert "note" not in live and live["rows"] == 5


def test_a_worker_that_compiled_from_the_machines_own_inductor_cache_still_publishes(tiny_models, tmp_path,
                                                                                    monkeypatch):
    """A local rerun finds its graphs in /tmp's inductor cache: the compile cache must still get them."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    batch = [req(*p) for p in PROMPTS]
    monkeypatch.setenv(flux_speed.CACHE_ENV, str(tmp_path / "first"))
    asyncio.run(serving_for("text2image", tiny_models["flux"], compile=True).run(batch))
    monkeypatch.setenv(flux_speed.CACHE_ENV, str(tmp_path / "second"))  # an empty compile cache
    import torch

    torch._dynamo.reset()  # as a new process: dynamo traces again, and inductor finds its graphs on disk
    again = serving_for("text2image", tiny_models["flux"], compile=True)
    asyncio.run(again.run(batch))
    report = again.speed_report()
    assert report["worker"] == "compiled" and report["graphs_compiled"] == 0 and report["graphs_loaded"] > 0
    assert len(list((tmp_path / "second").glob("*.torchcache"))) == 1
