"""The cost estimate: image-token rules, the price table, `run --dry-run` and `submit --dry-run` figures."""

import json

import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from dfk8s.cli import cli
from dfk8s.cost import pricing as cost
from dfk8s.errors import SpecError
from dfk8s.inputs.resize import fitted
from dfk8s.plan.launch import RunRequest, dry_run, prepare_run


def _image(path, size, fmt="PNG"):
    Image.new("RGB", size, (10, 120, 200)).save(path, fmt)
    return path.name


def _caption_manifest(tmp_path):
    a = _image(tmp_path / "a.png", (1024, 768))
    b = _image(tmp_path / "b.jpg", (2048, 4096), "JPEG")
    rows = [{"id": "r0", "image": a, "conversation": [{"from": "human", "value": "Describe it."}]},
            {"id": "r1", "image": b, "conversation": [{"from": "human", "value": "What is this?"}]},
            {"id": "r2", "image": "missing.png", "conversation": [{"from": "human", "value": "x"}]}]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----- the published rules, against the providers' own worked examples ------------------------------


def test_openai_tile_rule_matches_the_docs_examples():
    assert cost.tile_tokens(1024, 1024, 85, 170) == 765      # 768x768: 4 tiles
    assert cost.tile_tokens(2048, 4096, 85, 170) == 1105     # 1024x2048 -> 768x1536: 6 tiles
    assert cost.tile_tokens(300, 200, 85, 170) == 255        # never enlarged: 1 tile
    assert cost.tile_tokens(4096, 8192, 85, 170) == 1105     # fit in 2048 first


def test_openai_patch_rule_matches_the_docs_examples():
    assert cost.patch_tokens(1024, 1024, 1.0) == 1024        # 32 x 32 patches, under the cap
    assert cost.patch_tokens(1800, 2400, 1.0) == 1452        # scaled to 1056x1408: 33 x 44 patches
    assert cost.patch_tokens(1024, 1024, 1.62) == 1659       # gpt-4.1-mini / gpt-5-mini multiplier
    assert cost.patch_tokens(100, 100, 2.46) == 40           # 4 x 4 patches x 2.46 = 39.4 -> 40


def test_gemini_rule():
    assert cost.gemini_tokens(384, 384) == 258
    assert cost.gemini_tokens(385, 100) == 258               # one 768 tile
    assert cost.gemini_tokens(1000, 800) == 4 * 258           # 2 x 2 tiles
    assert cost.gemini_tokens(1536, 768) == 2 * 258


def test_fitted_keeps_aspect_and_only_shrinks():
    assert fitted(2048, 4096, 512) == (256, 512)
    assert fitted(300, 200, 512) == (300, 200)
    assert fitted(1000, 333, 500) == (500, 166)
    assert fitted(1000, 333, None) == (1000, 333)


def test_price_table_is_dated_and_names_its_sources():
    table = cost.load_prices()
    assert table.date and table.sources and "prices.yaml" in table.path
    for name in table.models:  # every entry parses
        table.price(name)
    with pytest.raises(SpecError, match="no price known for my-local-model"):
        table.price("my-local-model")


# ----- run --dry-run ------------------------------------------------------------------------------


def test_caption_estimate_matches_hand_computed_figures(tmp_path):
    manifest = _caption_manifest(tmp_path)
    out = tmp_path / "runs"
    request = RunRequest(pipeline="caption", input=str(manifest), output=str(out),
                         options={"model": "gpt-4o", "max_tokens": 50})
    found = dry_run(request)
    est = found.estimate
    assert not out.exists()  # count-only: nothing written
    assert (found.spec.rows, found.good_rows, found.spec.shards) == (3, 2, 1)
    # Images: 1024x768 -> 4 tiles -> 765; 2048x4096 -> 768x1536 -> 6 tiles -> 1105.
    assert est.input_image_tokens == 765 + 1105 and est.input_images == 2
    # Text: 2 x the 122-character caption system prompt + 12 + 13 characters = 269 -> 68 tokens,
    # plus 4 per message x 4 messages.
    assert est.input_text_tokens == 68 + 16
    assert est.output_tokens == 2 * 50 and "--max-tokens" in est.output_note
    # gpt-4o: $2.50 / 1M input, $10 / 1M output.
    assert est.sync_usd == pytest.approx((84 + 1870) * 2.5e-6 + 100 * 10e-6)  # $0.005885
    assert est.batch_usd == pytest.approx(est.sync_usd / 2) and not est.batch_note


def test_max_image_side_shows_the_saving(tmp_path):
    manifest = _caption_manifest(tmp_path)
    request = RunRequest(pipeline="caption", input=str(manifest), output=str(tmp_path / "runs"),
                         options={"model": "gpt-4o", "max_tokens": 50, "max_image_side": 512})
    est = dry_run(request).estimate
    # 1024x768 -> 512x384 and 2048x4096 -> 256x512: one tile each.
    assert est.input_image_tokens == 2 * 255 and est.unscaled_image_tokens == 1870
    assert est.unscaled_sync_usd - est.sync_usd == pytest.approx((1870 - 510) * 2.5e-6)
    assert any("--max-image-side 512: image tokens 1,870 -> 510" in line for line in est.lines())


def test_typical_output_is_stated_as_such(tmp_path):
    manifest = _caption_manifest(tmp_path)
    request = RunRequest(pipeline="caption", input=str(manifest), output=str(tmp_path / "runs"),
                         options={"model": "gpt-4o-mini"})
    est = dry_run(request).estimate
    assert est.output_tokens == 2 * 60 and "typical" in est.output_note
    # gpt-4o-mini bills images as 2833 + 5667 per tile.
    assert est.input_image_tokens == (2833 + 4 * 5667) + (2833 + 6 * 5667)


def test_openai_images_estimate(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": i, "conversation": [{"from": "human", "value": "a red fox"}]})
                            + "\n" for i in range(3)))
    request = RunRequest(pipeline="text2image", serving="openai-images", input=str(path),
                         output=str(tmp_path / "runs"),
                         options={"model": "gpt-image-1.5", "quality": "low", "size": "1024x1024"})
    est = dry_run(request).estimate
    assert est.output_images == 3
    text = 7 + 4 * 3  # 3 x "a red fox": 27 characters -> 7 tokens, plus 4 per message
    assert est.input_text_tokens == text
    assert est.sync_usd == pytest.approx(3 * 0.009 + text * 5e-6)
    # Unset quality is priced at the most it can cost, and says so.
    request.options = {"model": "gpt-image-1.5"}
    est = dry_run(request).estimate
    assert est.sync_usd == pytest.approx(3 * 0.2 + text * 5e-6)
    assert "the most it can cost" in est.image_note
    tally = cost.Tally(rows=1, requests=1, text_chars=8, messages=1)
    edit = cost.estimate(tally, "openai-images", {"model": "gpt-image-1.5"}, cost.load_prices(), "imageedit")
    assert edit.batch_note == "not available for imageedit with openai-images"
    assert "  price batch: not available for imageedit with openai-images" in edit.lines()


def test_gemini_edit_estimate(tmp_path):
    a = _image(tmp_path / "a.png", (300, 200))
    b = _image(tmp_path / "b.png", (1000, 800))
    path = tmp_path / "e.jsonl"
    path.write_text("".join(json.dumps({"id": i, "image": img, "conversation": [
        {"from": "human", "value": "make it blue"}]}) + "\n" for i, img in enumerate((a, b))))
    request = RunRequest(pipeline="imageedit", serving="gemini-images", input=str(path),
                         output=str(tmp_path / "runs"))
    est = dry_run(request).estimate
    assert est.model == "gemini-2.5-flash-image"
    assert est.input_image_tokens == 258 + 4 * 258
    text = 6 + 4 * 2  # 2 x "make it blue": 24 characters -> 6 tokens, plus 4 per message
    assert est.output_tokens == 2 * 1290 and est.output_images == 2
    assert est.sync_usd == pytest.approx((text + 5 * 258) * 0.30e-6 + 2 * 1290 * 30e-6)
    assert est.batch_usd == pytest.approx(est.sync_usd / 2)


def test_prices_file_overrides_and_is_named(tmp_path):
    manifest = _caption_manifest(tmp_path)
    table = {"table": "my negotiated prices", "date": "2026-12-01",
             "models": {"my-vlm": {"provider": "openai", "input_per_mtok": 1.0, "output_per_mtok": 2.0,
                                   "image_tokens": {"rule": "fixed", "tokens": 100},
                                   "typical_output_tokens": 10, "batch_discount": 0.25}}}
    prices = tmp_path / "prices.yaml"
    prices.write_text(yaml.safe_dump(table))
    result = CliRunner().invoke(cli, ["run", "--pipeline", "caption", "--input", str(manifest), "--output",
                                      str(tmp_path / "runs"), "--model", "my-vlm", "--prices", str(prices),
                                      "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "my negotiated prices (2026-12-01" in result.output
    sync = ((84 + 200) * 1.0 + 20 * 2.0) / 1e6
    assert f"price sync: ${sync:.6f}" in result.output
    assert f"price batch (25% off): ${sync * 0.75:.6f}" in result.output
    assert not (tmp_path / "runs").exists()


def test_unknown_model_is_not_guessed(tmp_path):
    manifest = _caption_manifest(tmp_path)
    result = CliRunner().invoke(cli, ["run", "--pipeline", "caption", "--input", str(manifest), "--output",
                                      str(tmp_path / "runs"), "--model", "qwen-vl-local", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "no price known for qwen-vl-local" in result.output and "price sync" not in result.output


def test_dry_run_uses_the_same_resume_checks_as_run(tmp_path, api_key):
    manifest = _caption_manifest(tmp_path)
    request = RunRequest(pipeline="caption", input=str(manifest), output=str(tmp_path / "runs"),
                         run_id="planned", options={"model": "gpt-4o"})
    prepare_run(request)
    other = tmp_path / "other.jsonl"
    other.write_text(manifest.read_text())
    for call in (dry_run, prepare_run):
        with pytest.raises(SpecError, match="was planned from"):
            call(RunRequest(pipeline="caption", input=str(other), output=str(tmp_path / "runs"),
                            run_id="planned"))
    # A planned run's dry run shows the estimate made when it was planned.
    found = dry_run(RunRequest(pipeline="caption", output=str(tmp_path / "runs"), run_id="planned"))
    assert found.resumed and found.estimate.input_image_tokens == 1870


def test_count_only_plan_counts_what_a_real_plan_writes(tmp_path, api_key):
    manifest = _caption_manifest(tmp_path)
    request = RunRequest(pipeline="caption", input=str(manifest), output=str(tmp_path / "runs"),
                         rows_per_shard=2, options={"model": "gpt-4o"})
    counted = dry_run(request).spec
    _, planned, _ = prepare_run(request)
    assert (counted.rows, counted.shards, counted.rows_per_shard) == (planned.rows, planned.shards,
                                                                       planned.rows_per_shard) == (3, 2, 2)


def test_max_cost_refuses_before_any_request(tmp_path, fake_api, api_key):
    manifest = _caption_manifest(tmp_path)
    result = CliRunner().invoke(cli, ["run", "--pipeline", "caption", "--input", str(manifest), "--output",
                                      str(tmp_path / "runs"), "--model", "gpt-4o", "--max-tokens", "50",
                                      "--api-url", fake_api.url + "/v1", "--max-cost", "0.005",
                                      "--run-id", "tight"])
    assert isinstance(result.exception, SpecError) and result.exception.exit_code == 42
    assert "estimated cost $0.005885" in str(result.exception) and "--max-cost $0.005000" in \
        str(result.exception)
    assert fake_api.requests() == []
    # The same run within budget: resumed with a higher --max-cost, it runs.
    result = CliRunner().invoke(cli, ["run", "--pipeline", "caption", "--output", str(tmp_path / "runs"),
                                      "--run-id", "tight", "--max-cost", "1", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert len(fake_api.requests()) == 2


def test_max_cost_needs_a_price(tmp_path, api_key):
    manifest = _caption_manifest(tmp_path)
    with pytest.raises(SpecError, match="no price known for qwen-vl-local"):
        prepare_run(RunRequest(pipeline="caption", input=str(manifest), output=str(tmp_path / "runs"),
                               options={"model": "qwen-vl-local"}, max_cost=1.0))
    # Without a budget an unpriced model (a local vLLM) runs as before.
    prepare_run(RunRequest(pipeline="caption", input=str(manifest), output=str(tmp_path / "runs"),
                           options={"model": "qwen-vl-local"}))


def test_usage_sums_and_round_trips_every_field():
    """Usage.add and to_dict are spelled out for speed: each must still cover every field."""
    import dataclasses

    from dfk8s.cost.usage import Usage

    names = [f.name for f in dataclasses.fields(Usage)]
    one = Usage(**{name: k + 1 for k, name in enumerate(names)})
    two = Usage(**{name: 10 * (k + 1) for k, name in enumerate(names)})
    total = Usage().add(one).add(two)
    assert dataclasses.asdict(total) == {name: 11 * (k + 1) for k, name in enumerate(names)}
    assert list(total.to_dict()) == names and Usage.from_dict(total.to_dict()) == total
    assert Usage.from_dict({"input_tokens": 3, "unknown": 1}) == Usage(input_tokens=3)
