"""The diffusers serving on tiny random FLUX / FLUX Kontext pipelines, loaded through from_pretrained."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("sentencepiece")
torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402

from dfk8s.errors import SpecError  # noqa: E402
from dfk8s.run.spec import RunSpec  # noqa: E402
from dfk8s.servings import build_serving  # noqa: E402
from dfk8s.servings.base import ImageInput, Message, Request, Response, RowError  # noqa: E402
from dfk8s.servings.diffusers_flux import DiffusersServing  # noqa: E402
from tests.conftest import FIXTURES  # noqa: E402

INPUT_PNG = FIXTURES / "dataflow-mm/dataflow/example/text2image_eval/1.png"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = dict(steps=2, height=64, width=64, dtype="float32", batch_size=4)
TINY_KONTEXT = dict(steps=2, dtype="float32", max_area=64 * 64, auto_resize=False, batch_size=4)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def spec_for(pipeline: str, **options) -> RunSpec:
    return RunSpec(run_id="test", pipeline=pipeline, serving="diffusers", options=options)


def serving_for(pipeline: str, model: Path, **options) -> DiffusersServing:
    base = TINY if pipeline == "text2image" else TINY_KONTEXT
    serving = build_serving(spec_for(pipeline, model=str(model), **{**base, **options}))
    assert isinstance(serving, DiffusersServing)
    return serving


def req(row_id: str, prompt: str, seed: int, images: list[bytes] = ()) -> Request:
    inputs = [ImageInput(data, "image/png", f"mem:{row_id}/{k}") for k, data in enumerate(images)]
    return Request(row_id=row_id, messages=[Message("user", prompt, tuple(inputs))], images=inputs, seed=seed)


def run(serving, batch):
    return asyncio.run(serving.run(batch))


def png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG_MAGIC)
    with Image.open(io.BytesIO(data)) as img:
        return img.size


def small_png(size=(48, 64)) -> bytes:
    """The fixture photo, scaled down (an odd aspect, so Kontext's output keeps it)."""
    with Image.open(INPUT_PNG) as img:
        buf = io.BytesIO()
        img.convert("RGB").resize(size).save(buf, "PNG")
        return buf.getvalue()


def pixel_diff(a: bytes, b: bytes):
    import numpy as np

    arrays = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16) for data in (a, b)]
    assert arrays[0].shape == arrays[1].shape
    return np.abs(arrays[0] - arrays[1])


def assert_same_image(a: bytes, b: bytes) -> None:
    """Equal bytes, or equal but for float rounding: at most one level on under 1% of the values."""
    if a != b:
        diff = pixel_diff(a, b)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


PROMPTS = [("r0", "a fox darting between snow-covered pines at dusk", 11),
           ("r1", "a kite surfer riding emerald waves", 22),
           ("r2", "a red vase on a wooden table", 33)]


def test_options_and_defaults():
    s = DiffusersServing.from_spec(spec_for("text2image"))
    assert (s.model, s.steps, s.guidance, s.height, s.width, s.batch_size, s.images_per_prompt, s.dtype_name,
            s.cpu_offload) == ("black-forest-labs/FLUX.1-dev", 28, 3.5, 1024, 1024, 4, 1, "bfloat16", False)
    assert s.concurrency == len(s.devices) >= 1
    k = DiffusersServing.from_spec(spec_for("imageedit"))
    assert (k.model, k.guidance, k.height, k.width, k.max_area, k.auto_resize) == \
        ("black-forest-labs/FLUX.1-Kontext-dev", 2.5, None, None, 1024 ** 2, True)
    assert DiffusersServing.from_spec(spec_for("imageedit", height=512, width=768)).max_area == 512 * 768
    with pytest.raises(SpecError, match="dtype"):
        DiffusersServing.from_spec(spec_for("text2image", dtype="int8"))
    with pytest.raises(SpecError, match="steps"):
        DiffusersServing.from_spec(spec_for("text2image", steps="many"))
    with pytest.raises(SpecError, match="caption"):
        DiffusersServing.from_spec(spec_for("caption"))


def test_text2image_generates_pngs_and_is_deterministic(tiny_models):
    first = serving_for("text2image", tiny_models["flux"], images_per_prompt=2)
    results = run(first, [req(*p) for p in PROMPTS])
    assert all(isinstance(r, Response) and len(r.images) == 2 for r in results), results
    assert {png_size(img) for r in results for img in r.images} == {(64, 64)}
    assert results[0].images[0] != results[0].images[1]  # a row's images are different draws
    assert len(first.pipelines) == 1 and type(first.pipelines[0]).__name__ == "FluxPipeline"
    assert first.pipelines[0].transformer.dtype == torch.float32
    singles = [run(first, [req(*p)])[0] for p in PROMPTS]

    # A fresh serving (a fresh load), same seeds, same batches: the same bytes.
    second = serving_for("text2image", tiny_models["flux"], images_per_prompt=2)
    assert [r.images for r in run(second, [req(*p) for p in PROMPTS])] == [r.images for r in results]
    assert run(second, [req(*PROMPTS[1])])[0].images == singles[1].images
    # One row at a time: the same images as in the batch of 3 (each row has its own generator); only float
    # rounding may differ with the batch's size, by a level on a few pixels.
    for batched, alone in zip(results, singles, strict=True):
        for a, b in zip(batched.images, alone.images, strict=True):
            assert_same_image(a, b)
    # Another seed, same prompt: another image.
    (other,) = run(second, [req("r0", PROMPTS[0][1], 12)])
    assert pixel_diff(other.images[0], results[0].images[0]).mean() > 10
    first.close()
    second.close()


def test_kontext_edits_and_rejects_rows_with_two_images(tiny_models):
    serving = serving_for("imageedit", tiny_models["kontext"])
    photo, wide = small_png((48, 64)), small_png((64, 32))
    batch = [req("e0", "change the horse's colour to black", 1, [photo]),
             req("e1", "make the sky red", 2, [photo, photo]),
             req("e2", "turn it into an oil painting", 3, [wide]),
             req("e3", "make it night", 4, [photo])]
    results = run(serving, batch)
    assert isinstance(results[1], RowError) and results[1].type == "TooManyImages", results[1]
    assert "2" in results[1].message
    for k in (0, 2, 3):
        assert isinstance(results[k], Response) and len(results[k].images) == 1, results[k]
    # The output keeps each input's aspect, scaled to max_area (multiples of 2 for this VAE).
    assert png_size(results[0].images[0]) == (54, 74)
    assert png_size(results[2].images[0]) == (90, 44)
    assert type(serving.pipelines[0]).__name__ == "FluxKontextPipeline"
    # Same row alone: same bytes (rows with different input sizes never share a call).
    (alone,) = run(serving, [batch[2]])
    assert alone.images == results[2].images
    serving.close()


def test_one_pipeline_per_device_keeps_each_busy(tiny_models):
    # Two "devices" on the CPU stand in for two GPUs: two pipelines, two batches in flight at once.
    serving = DiffusersServing(pipeline="text2image", model=str(tiny_models["flux"]), devices=["cpu", "cpu"],
                               steps=2, height=64, width=64, dtype="float32", max_sequence_length=32)
    assert serving.concurrency == 2
    used, original = [], serving.run_sync

    def recording(pipe, batch):
        used.append(id(pipe))
        return original(pipe, batch)

    serving.run_sync = recording

    async def two_batches():
        return await asyncio.gather(serving.run([req(*PROMPTS[0])]), serving.run([req(*PROMPTS[1])]))

    first, second = asyncio.run(two_batches())
    assert len(serving.pipelines) == 2 and len(set(used)) == 2
    assert isinstance(first[0], Response) and isinstance(second[0], Response)
    serving.close()


def test_out_of_memory_splits_the_batch(tiny_models, monkeypatch):
    serving = serving_for("text2image", tiny_models["flux"])
    expected = [run(serving, [req(*p)])[0] for p in PROMPTS]  # what the split ends with: rows one by one
    pipe = serving.pipelines[0]
    calls = []
    original = type(pipe).__call__

    def small_gpu(self, *args, **kwargs):
        # A stand-in for a real CUDA OOM: there is no GPU here, so pretend memory holds one prompt only.
        calls.append(len(kwargs["prompt"]))
        if len(kwargs["prompt"]) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", small_gpu)
    results = run(serving, [req(*p) for p in PROMPTS])
    assert calls == [3, 2, 1, 1, 1]  # 3 -> 2 + 1 -> 1 + 1 + 1
    assert [r.images for r in results] == [r.images for r in expected]
    assert [r.attempts for r in results] == [3, 3, 2]

    def always_oom(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(type(pipe), "__call__", always_oom)
    results = run(serving, [req(*p) for p in PROMPTS[:2]])
    assert [(r.type, r.attempts) for r in results] == [("OutOfMemory", 2), ("OutOfMemory", 2)]
    serving.close()


def test_a_failing_row_fails_alone(tiny_models, monkeypatch):
    serving = serving_for("text2image", tiny_models["flux"])
    run(serving, [req(*PROMPTS[0])])
    pipe = serving.pipelines[0]
    original = type(pipe).__call__

    def picky(self, *args, **kwargs):
        if any("vase" in p for p in kwargs["prompt"]):
            raise ValueError("cannot draw\nvases")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", picky)
    results = run(serving, [req(*p) for p in PROMPTS])
    assert [type(r).__name__ for r in results] == ["Response", "Response", "RowError"]
    assert (results[2].type, results[2].message, results[2].attempts) == \
        ("ValueError", "cannot draw vases", 2)
    serving.close()


def test_missing_model_is_a_spec_error(tmp_path):
    serving = serving_for("text2image", tmp_path / "no-such-model")
    with pytest.raises(SpecError, match="no-such-model") as info:
        run(serving, [req(*PROMPTS[0])])
    assert "\n" not in str(info.value)
    assert info.value.exit_code == 42
    # Not cached and offline: a hub name fails the same way, at once.
    hub = serving_for("text2image", "black-forest-labs/FLUX.1-dev")
    with pytest.raises(SpecError, match="FLUX.1-dev"):
        run(hub, [req(*PROMPTS[0])])


@pytest.mark.slow
def test_end_to_end_local_runs(tiny_models, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from dfk8s.executors.local.launch import run_local
    from dfk8s.plan.launch import RunRequest

    seed_docs = FIXTURES / "seed-docs"
    cases = {"text2image": ("text2image.jsonl", tiny_models["flux"], "images", {}),
             "imageedit": ("imageedit.jsonl", tiny_models["kontext"], "edited_images",
                           {"max_area": 4096, "auto_resize": False})}

    def run_case(pipeline):
        manifest, model, _, extra = cases[pipeline]
        options = {"model": str(model), "steps": 2, "height": 64, "width": 64, "dtype": "float32", **extra}
        request = RunRequest(pipeline=pipeline, output=str(tmp_path / pipeline), run_id=f"e2e-{pipeline}",
                             input=str(seed_docs / manifest), serving="diffusers", options=options)
        return run_local(request, workers=1)

    with ThreadPoolExecutor(2) as pool:  # each run's worker process spends most of its time importing torch
        summaries = dict(zip(cases, pool.map(run_case, cases), strict=True))
    for pipeline, (manifest, _, key, _) in cases.items():
        expected = sum(1 for line in (seed_docs / manifest).read_text().splitlines() if line.strip())
        assert (summaries[pipeline].rows, summaries[pipeline].ok) == (expected, expected), summaries[pipeline]
        run_dir = tmp_path / pipeline / f"e2e-{pipeline}"
        rows = [json.loads(line) for line in (run_dir / "result.jsonl").read_text().splitlines()]
        assert len(rows) == expected
        for pos, row in enumerate(rows):
            assert "error" not in row, row
            assert len(row[key]) == 1 and row[key][0].endswith(f"images/{pos}/0.png"), row
            assert png_size((run_dir / "images" / str(pos) / "0.png").read_bytes()) == (64, 64)
