"""Actual usage and the budget during a run (real SDKs against the fake), and --max-image-side."""

import io
import json

import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from dfk8s.cli import cli
from dfk8s.executors.local.launch import run_local
from dfk8s.inputs.resize import shrink_image
from dfk8s.plan.launch import RunRequest
from dfk8s.run import layout
from dfk8s.servings.base import ImageInput
from dfk8s.storage import open_storage
from dfk8s.testing.fake_api._wire import words


def _png(path, size, mode="RGB"):
    Image.new(mode, size, (200, 30, 30) if mode == "RGB" else (200, 30, 30, 128)).save(path, "PNG")
    return path.name


def _captions(tmp_path, n, size=(640, 480)):
    img = _png(tmp_path / "img.png", size)
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "image": img, "conversation": [
        {"from": "human", "value": f"Describe picture number {i}."}]}) + "\n" for i in range(n)))
    return path


def _summary(tmp_path, run_id):
    return json.loads((tmp_path / "runs" / run_id / layout.SUMMARY_KEY).read_text())


# ----- usage in summary.json ---------------------------------------------------------------------


def test_caption_usage_is_summed_into_summary(tmp_path, fake_api, api_key):
    manifest = _captions(tmp_path, 6)
    request = RunRequest(pipeline="caption", input=str(manifest), output=str(tmp_path / "runs"), run_id="u",
                         rows_per_shard=3, options={"api_url": fake_api.url + "/v1", "model": "gpt-4o"})
    summary = run_local(request, workers=2)
    # The fake's usage rule: a word of text is a token, an image 85 tokens; the answer's words out.
    sent = fake_api.requests()
    messages = [m for r in sent for m in r["body"]["messages"]]
    prompt = sum(words(m["content"]) if isinstance(m["content"], str) else
                 sum(words(p.get("text", "")) for p in m["content"]) for m in messages)
    prompt += 85 * sum(r["n_images"] for r in sent)
    rows = [json.loads(line) for line in (tmp_path / "runs/u/result.jsonl").read_text().splitlines()]
    completion = sum(words(r["caption"]) for r in rows)
    data = _summary(tmp_path, "u")
    assert data["usage"]["input_tokens"] == prompt and data["usage"]["output_tokens"] == completion
    assert data["usage"]["requests"] == 6
    assert data["cost_usd"] == pytest.approx((prompt * 2.5 + completion * 10) / 1e6, abs=1e-6)
    assert set(data["shard_costs"]) == {"0", "1"}
    shards_usd = sum(s["cost_usd"] for s in data["shard_costs"].values())
    assert shards_usd == pytest.approx(data["cost_usd"], abs=1e-6)
    assert summary.cost_usd == data["cost_usd"]


def test_summary_line_prints_the_cost(tmp_path, fake_api, api_key):
    manifest = _captions(tmp_path, 2)
    result = CliRunner().invoke(cli, ["run", "--pipeline", "caption", "--input", str(manifest), "--output",
                                      str(tmp_path / "runs"), "--api-url", fake_api.url + "/v1", "--model",
                                      "gpt-4o", "--workers", "1", "--run-id", "line"])
    assert result.exit_code == 0, result.output
    cost_usd = _summary(tmp_path, "line")["cost_usd"]
    assert f"cost ${cost_usd:.6f}" in result.output and "2 images" not in result.output
    status = CliRunner().invoke(cli, ["status", "line", "--output", str(tmp_path / "runs")])
    assert f"spent: ${cost_usd:.6f}; estimate $" in status.output and "(sync)" in status.output


def test_image_usage_is_priced_by_modality(tmp_path, fake_api, api_key, monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", "test-key")
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": i, "conversation": [{"from": "human", "value": "a red fox"}]})
                            + "\n" for i in range(3)))
    run_local(RunRequest(pipeline="text2image", serving="gemini-images", input=str(path),
                         output=str(tmp_path / "runs"), run_id="g", options={"api_url": fake_api.url}),
              workers=1)
    data = _summary(tmp_path, "g")
    usage = data["usage"]
    # The fake answers each image with 1290 IMAGE tokens plus its text part's words as TEXT tokens.
    assert usage["images"] == 3 and usage["output_image_tokens"] == 3 * 1290
    text_out = usage["output_tokens"] - usage["output_image_tokens"]
    assert text_out > 0
    expected = (usage["input_tokens"] * 0.30 + text_out * 2.50 + 3 * 1290 * 30.0) / 1e6
    assert data["cost_usd"] == pytest.approx(expected, abs=1e-6)

    run_local(RunRequest(pipeline="text2image", serving="openai-images", input=str(path),
                         output=str(tmp_path / "runs"), run_id="o",
                         options={"api_url": fake_api.url + "/v1", "model": "gpt-image-1.5"}), workers=1)
    usage = _summary(tmp_path, "o")["usage"]
    # gpt-image usage: the prompt's words in, 272 image tokens out per image.
    assert usage["input_tokens"] == 3 * 3 and usage["output_image_tokens"] == 3 * 272 and usage["images"] == 3
    assert _summary(tmp_path, "o")["cost_usd"] == pytest.approx((9 * 5.0 + 3 * 272 * 32.0) / 1e6, abs=1e-6)


# ----- the budget during a run -------------------------------------------------------------------


def _cheap_estimate_prices(tmp_path):
    """A table whose typical answer is 1 token at $1,000 / 1M: the estimate passes, real answers do not.

    An answer is at most 20 tokens (the table's cap): what the budget reserves for each request.
    """
    table = {"table": "test prices", "date": "2026-12-01", "models": {"gpt-4o": {
        "provider": "openai", "input_per_mtok": 0.0, "output_per_mtok": 1000.0,
        "image_tokens": {"rule": "fixed", "tokens": 0}, "typical_output_tokens": 1, "max_output_tokens": 20,
        "batch_discount": 0.5}}}
    path = tmp_path / "prices.yaml"
    path.write_text(yaml.safe_dump(table))
    return path


def test_run_stops_within_the_budget_and_resumes(tmp_path, fake_api, api_key):
    manifest = _captions(tmp_path, 40)
    prices = _cheap_estimate_prices(tmp_path)
    args = ["run", "--pipeline", "caption", "--output", str(tmp_path / "runs"), "--api-url",
            fake_api.url + "/v1", "--model", "gpt-4o", "--prices", str(prices), "--workers", "1",
            "--max-concurrency", "1", "--save-interval", "1", "--shards", "4", "--run-id", "b"]
    # Estimate: 40 requests x 1 token x $0.001 = $0.04, under $0.10; each real answer is ~15 words, and
    # each request may cost up to 20 tokens ($0.02): that much is reserved before it is sent.
    result = CliRunner().invoke(cli, args + ["--input", str(manifest), "--max-cost", "0.1"])
    assert result.exit_code == 1, result.output
    sent = len(fake_api.requests())
    per_request = 1000.0 * 15 / 1e6
    assert 2 < sent < 40  # it stopped within $0.10, well before the end
    data = _summary(tmp_path, "b")
    assert data["cost_usd"] <= 0.1 and data["cost_usd"] == pytest.approx(sent * per_request, rel=0.3)
    assert data["failed_shards"] and data["not_processed"] == 40 - sent and data["ok"] == sent
    assert data["budget"] == {"max_cost": 0.1, "stopped_shards": [0, 1, 2, 3]}
    assert "stopped at --max-cost" in result.output
    # Every finished row is kept: a resume with a higher budget sends only the rest, nothing twice.
    result = CliRunner().invoke(cli, args + ["--max-cost", "10"])
    assert result.exit_code == 0, result.output
    assert len(fake_api.requests()) == 40
    assert _summary(tmp_path, "b")["ok"] == 40


# ----- --max-image-side --------------------------------------------------------------------------


def _input(data: bytes) -> ImageInput:
    with Image.open(io.BytesIO(data)) as img:
        return ImageInput(data, Image.MIME[img.format], "x", img.width, img.height)


def _encode(size, fmt, mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, (1, 2, 3) if mode == "RGB" else (1, 2, 3, 100)).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize(("size", "fmt", "mode", "expected"), [
    ((2000, 1000), "JPEG", "RGB", (500, 250)),
    ((600, 1800), "PNG", "RGBA", (167, 500)),
    ((1001, 999), "WEBP", "RGB", (500, 499)),
])
def test_downscale_keeps_aspect_and_format(size, fmt, mode, expected):
    image = _input(_encode(size, fmt, mode))
    small = shrink_image(image, 500)
    assert (small.width, small.height) == expected and small.mime == image.mime and small.ref == "x"
    with Image.open(io.BytesIO(small.data)) as img:
        assert img.format == fmt and img.size == expected and img.mode == mode
    assert abs(small.width / small.height - size[0] / size[1]) < 0.01


def test_downscale_applies_only_over_the_limit():
    image = _input(_encode((500, 300), "PNG"))
    assert shrink_image(image, 500) is image and shrink_image(image, None) is image


def test_caption_sends_the_downscaled_image_and_keeps_the_path(tmp_path, fake_api, api_key):
    manifest = _captions(tmp_path, 2, size=(1600, 1200))
    run_local(RunRequest(pipeline="caption", input=str(manifest), output=str(tmp_path / "runs"), run_id="s",
                         options={"api_url": fake_api.url + "/v1", "max_image_side": 400}), workers=1)
    rows = [json.loads(line) for line in (tmp_path / "runs/s/result.jsonl").read_text().splitlines()]
    assert all("400x300 png" in r["caption"] for r in rows)  # the fake describes what it received
    # The row names the original image (not the downscaled copy), by a path that resolves from anywhere.
    assert all(r["image"] == str(tmp_path / "img.png") for r in rows)
    assert open_storage(str(tmp_path / "runs/s")).exists(layout.COST_KEY)


def test_mask_and_max_image_side_exclude_each_other(tmp_path, api_key):
    from dfk8s.errors import SpecError
    from dfk8s.run.spec import RunSpec
    from dfk8s.servings.openai_images import OpenAIImagesServing

    spec = RunSpec(run_id="m", pipeline="imageedit", serving="openai-images",
                   options={"mask": str(tmp_path / "mask.png"), "max_image_side": 512})
    with pytest.raises(SpecError, match="exclude each other"):
        OpenAIImagesServing.from_spec(spec)


def test_a_reopened_shard_keeps_what_it_already_cost(tmp_path, fake_api, api_key):
    """`dfk8s retry` reopens a finished shard as one part of plain records (no usage): its spend stays."""
    from dfk8s.worker.shard import process_shard

    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"conversation": [{"from": "human", "value": text}]}) + "\n"
                            for text in ("first question", "second [[refuse]]", "third question")))
    storage = open_storage(str(tmp_path / "runs"))
    run_local(RunRequest(pipeline="vqa", input=str(path), output=str(tmp_path / "runs"), run_id="r",
                         options={"api_url": fake_api.url + "/v1", "model": "gpt-4o"}), workers=1)
    run = storage.child("r")
    first = run.read_json(layout.shard_done_key(0))
    assert first["failed"] == 1 and first["usage"]["requests"] == 3  # the refusal was paid for too
    # Reopen as a retry does: the output becomes a part of the kept rows, the done marker goes.
    rows = [json.loads(line) for line in run.open_lines(layout.shard_output_key(0))]
    shard = [json.loads(line) for line in run.open_lines(layout.shard_input_key(0))]
    kept = [{"pos": s["pos"], "id": s["id"], "ok": True, "row": r} for s, r in zip(shard, rows, strict=True)
            if "error" not in r]
    run.write_bytes(layout.part_key(0, 0), "".join(json.dumps(k) + "\n" for k in kept).encode())
    run.delete(layout.shard_done_key(0))
    fake_api.configure(rate_refusal=0.0)
    again = process_shard(run, 0)  # the refused row is sent again (and refused again: still paid)
    assert again.usage["requests"] == first["usage"]["requests"] + 1
    assert again.usage["input_tokens"] > first["usage"]["input_tokens"]
    assert again.cost_usd > first["cost_usd"]


def test_parallel_workers_share_the_budget(tmp_path, fake_api, api_key):
    manifest = _captions(tmp_path, 200)
    prices = _cheap_estimate_prices(tmp_path)
    fake_api.configure(latency=0.2)  # ~10 requests/s per worker: a realistic pace, not a burst
    result = CliRunner().invoke(cli, [
        "run", "--pipeline", "caption", "--input", str(manifest), "--output", str(tmp_path / "runs"),
        "--api-url", fake_api.url + "/v1", "--model", "gpt-4o", "--prices", str(prices), "--workers", "2",
        "--max-concurrency", "2", "--save-interval", "1", "--shards", "2", "--run-id", "p",
        "--max-cost", "0.3"])
    assert result.exit_code == 1, result.output
    data = _summary(tmp_path, "p")
    assert set(data["shard_costs"]) == {"0", "1"}  # both shards ran at once
    # Each shard keeps to its share of the budget ($0.15 each, by rows): together they never pass $0.30,
    # requests in flight included, and they use most of it.
    assert 0.2 <= data["cost_usd"] <= 0.3
    assert len(fake_api.requests()) < 200
