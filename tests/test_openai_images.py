"""openai-images through the real openai SDK against the fake API server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import time

import pytest
from PIL import Image

from dfk8s.errors import SpecError
from dfk8s.executors.local.launch import run_local
from dfk8s.plan.launch import RunRequest
from dfk8s.run.spec import RunSpec
from dfk8s.servings.api import RetryableError, RowFailure
from dfk8s.servings.base import ImageInput, Message, Request, Response, RowError
from dfk8s.servings.openai_images import download_image
from dfk8s.testing.fake_api import FakeAPI, FakeConfig
from tests.conftest import SEED_DOCS as FIXTURES  # noqa: E402
from tests.image_api_helpers import decodes, run


@pytest.fixture(scope="module")
def server():
    with FakeAPI(FakeConfig()) as api:
        yield api


@pytest.fixture
def api(server, monkeypatch):
    server.config = FakeConfig()
    server.reset()
    monkeypatch.setenv("DF_API_KEY", "sk-test")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("DF_BASE_URL", raising=False)
    return server


def png(size=(32, 32), color=(200, 10, 10), mode="RGB", fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else color + (0,)).save(buf, fmt)
    return buf.getvalue()


def image_input(size=(32, 32), **kw) -> ImageInput:
    data = png(size, **kw)
    fmt = kw.get("fmt", "PNG")
    return ImageInput(data, Image.MIME[fmt], f"in-{size[0]}x{size[1]}.{fmt.lower()}", *size)


def request(prompt="a red fox", images=(), row_id="r0") -> Request:
    messages = [Message("system", "ignored by image APIs"), Message("user", prompt, tuple(images))]
    return Request(row_id, messages, list(images))


def spec(api, pipeline="text2image", **options) -> RunSpec:
    options.setdefault("api_url", api.url)
    options.setdefault("model", "gpt-image-1.5")
    return RunSpec(run_id="t", pipeline=pipeline, serving="openai-images", options=options)


# ----- generate and edit ---------------------------------------------------------------------------------


def test_generate_gpt_image_b64_several_images(api):
    [result] = run(spec(api, images_per_prompt=2, size="1536x1024", quality="high"), request())
    assert isinstance(result, Response), result
    assert len(result.images) == 2 and all(decodes(d).format == "PNG" for d in result.images)
    assert decodes(result.images[0]).size == (64, 43)  # the fake scales 1536x1024 to 64 px
    assert result.attempts == 1 and "usage" in result.meta
    [entry] = api.requests()
    assert entry["path"] == "/v1/images/generations"
    assert entry["body"] == {"model": "gpt-image-1.5", "prompt": "a red fox", "n": 2, "size": "1536x1024",
                             "quality": "high"}  # no response_format for GPT image models


def test_generate_dall_e_3_b64_by_default_keeps_revised_prompt(api):
    [result] = run(spec(api, model="dall-e-3", size="1792x1024", quality="hd"), request())
    assert isinstance(result, Response) and len(result.images) == 1
    assert result.meta["revised_prompts"] == ["fake revised prompt: a red fox"]
    body = api.requests()[0]["body"]
    assert body["response_format"] == "b64_json" and body["n"] == 1 and body["quality"] == "hd"
    assert api.stats()["files_served"] == 0


def test_generate_dall_e_2_url_is_downloaded(api):
    [result] = run(spec(api, model="dall-e-2", response_format="url", images_per_prompt=3, size="256x256"),
                   request())
    assert isinstance(result, Response) and len(result.images) == 3
    assert all(decodes(d).size == (64, 64) for d in result.images)
    assert api.stats()["files_served"] == 3
    assert api.stats()["by_endpoint"] == {"images.generations": 1}


def test_edit_gpt_image_several_images_and_mask(api, tmp_path):
    mask = tmp_path / "mask.png"
    mask.write_bytes(png((48, 32), mode="RGBA"))
    images = [image_input((48, 32)), image_input((20, 20), fmt="JPEG"), image_input((16, 16), fmt="GIF")]
    [result] = run(spec(api, "imageedit", mask=str(mask)), request("make it blue", images))
    assert isinstance(result, Response) and len(result.images) == 1
    [entry] = api.requests()
    assert entry["path"] == "/v1/images/edits" and entry["has_mask"] and entry["n_images"] == 3
    files = entry["body"]["files"]
    assert [f["field"] for f in files] == ["image[]", "image[]", "image[]", "mask"]
    # The GIF went out as PNG: the API takes png, jpeg and webp only.
    assert [f["content_type"] for f in files] == ["image/png", "image/jpeg", "image/png", "image/png"]
    assert entry["body"]["prompt"] == "make it blue" and entry["body"]["model"] == "gpt-image-1.5"


def test_edit_dall_e_2_one_square_png(api):
    ok, non_square, two = run(spec(api, "imageedit", model="dall-e-2", size="512x512"),
                              request(images=[image_input((40, 40))], row_id="a"),
                              request(images=[image_input((40, 30))], row_id="b"),
                              request(images=[image_input(), image_input()], row_id="c"))
    assert isinstance(ok, Response) and decodes(ok.images[0]).size == (64, 64)
    assert isinstance(non_square, RowError) and non_square.type == "BadInput"
    assert "square" in non_square.message
    assert isinstance(two, RowError) and two.type == "BadInput" and "at most 1" in two.message
    [entry] = api.requests()  # only the good row reached the server
    assert entry["body"]["files"][0]["field"] == "image" and entry["body"]["response_format"] == "b64_json"


def test_mask_size_must_match_first_image(api, tmp_path):
    mask = tmp_path / "mask.png"
    mask.write_bytes(png((10, 10), mode="RGBA"))
    [result] = run(spec(api, "imageedit", mask=str(mask)), request(images=[image_input((32, 32))]))
    assert isinstance(result, RowError) and result.type == "BadInput" and "mask is 10x10" in result.message
    assert api.stats()["requests_total"] == 0


# ----- per-model option checks: SpecError before any request -------------------------------------------


@pytest.mark.parametrize("pipeline, options, words", [
    ("text2image", {"model": "dall-e-3", "images_per_prompt": 2}, ["dall-e-3", "1 images per prompt"]),
    ("imageedit", {"model": "dall-e-3"}, ["dall-e-3 cannot edit", "dall-e-2"]),
    ("text2image", {"model": "dall-e-2", "size": "1792x1024"}, ["dall-e-2", "256x256, 512x512, 1024x1024"]),
    ("text2image", {"model": "dall-e-3", "quality": "high"}, ["dall-e-3", "auto, standard, hd"]),
    ("text2image", {"model": "gpt-image-1.5", "quality": "hd"}, ["gpt-image-1.5", "low, medium, high"]),
    ("text2image", {"model": "gpt-image-1.5", "size": "1536x864"}, ["gpt-image-1.5", "1024x1536"]),
    ("text2image", {"model": "gpt-image-2", "size": "1000x1000"}, ["gpt-image-2", "multiples of 16"]),
    ("text2image", {"model": "gpt-image-2", "size": "3840x768"}, ["gpt-image-2", "1:3..3:1"]),
    ("text2image", {"model": "gpt-image-1", "response_format": "url"}, ["gpt-image-1", "no response_format"]),
    ("text2image", {"model": "gpt-image-1-mini", "images_per_prompt": 11}, ["gpt-image-1-mini", "1..10"]),
    ("text2image", {"model": "dall-e-2", "response_format": "png"}, ["b64_json, url"]),
    ("text2image", {"mask": "/nonexistent.png"}, ["imageedit pipeline only"]),
    ("imageedit", {"mask": "/nonexistent.png"}, ["mask", "not found"]),
    ("caption", {}, ["text2image and imageedit"]),
])
def test_bad_options_fail_before_any_request(api, pipeline, options, words):
    with pytest.raises(SpecError) as info:
        run(spec(api, pipeline, **options), request())
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert api.stats()["requests_total"] == 0


def test_mask_must_be_png_with_alpha(api, tmp_path):
    for name, data, words in [("m.jpg", png(fmt="JPEG"), "must be a PNG"), ("m.png", png(), "no alpha")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(SpecError, match=words):
            run(spec(api, "imageedit", mask=str(tmp_path / name)), request())
    assert api.stats()["requests_total"] == 0


def test_free_sizes_for_gpt_image_2_and_unknown_models_pass_through(api):
    [a, b] = run(spec(api, model="gpt-image-2", size="1536x864", quality="low"), request(row_id="a"),
                 request("a blue fox", row_id="b"))
    assert isinstance(a, Response) and isinstance(b, Response)
    [c] = run(spec(api, model="my-compatible-model", size="777x333", quality="ultra"), request())
    assert isinstance(c, Response)
    assert api.requests()[-1]["body"] == {"model": "my-compatible-model", "prompt": "a red fox", "n": 1,
                                          "size": "777x333", "quality": "ultra"}


def test_missing_key_is_a_spec_error(api, monkeypatch):
    monkeypatch.delenv("DF_API_KEY")
    with pytest.raises(SpecError, match="DF_API_KEY"):
        run(spec(api), request())


def test_empty_and_overlong_prompts_fail_the_row_without_a_request(api):
    empty, long_ = run(spec(api, model="dall-e-2"), request("  ", row_id="a"),
                       request("x" * 1001, row_id="b"))
    assert empty.type == "BadInput" and long_.type == "BadInput" and "1000" in long_.message
    assert api.stats()["requests_total"] == 0


# ----- faults ------------------------------------------------------------------------------------------


def test_429_retry_after_is_honoured_with_exact_counts(api):
    api.configure(fail_first=2, retry_after=0.3)
    started = time.monotonic()
    [result] = run(spec(api), request(), no_wait=False)
    assert isinstance(result, Response) and result.attempts == 3
    assert time.monotonic() - started >= 0.6  # two waits of Retry-After: 0.3
    stats = api.stats()
    assert stats["requests_total"] == 3 and stats["by_status"] == {"429": 2, "200": 1}
    assert stats["retry_after_sent"] == [0.3, 0.3]


def test_429_gives_up_after_max_retries(api):
    api.configure(fail_first=5, retry_after=0)
    [result] = run(spec(api, max_retries=2), request())
    assert isinstance(result, RowError) and result.type == "RateLimited" and result.attempts == 3
    assert api.stats()["requests_total"] == 3


def test_5xx_is_retried_until_success(api):
    api.configure(rate_5xx=0.5, seed=3)
    results = run(spec(api, max_retries=8), *(request(f"fox {i}", row_id=str(i)) for i in range(8)))
    assert all(isinstance(r, Response) for r in results)
    stats = api.stats()
    faults = sum(stats["faults"].values())
    assert faults > 0 and sum(r.attempts for r in results) == stats["requests_total"] == 8 + faults


def test_server_error_trigger_gives_up(api):
    [result] = run(spec(api, max_retries=1), request("fox [[500]]"))
    assert isinstance(result, RowError) and result.type == "ServerError" and result.attempts == 2


@pytest.mark.parametrize("trigger, kind", [("[[malformed]]", "MalformedResponse"),
                                           ("[[empty]]", "EmptyResponse")])
def test_malformed_and_empty_are_retried_then_fail(api, trigger, kind):
    [result] = run(spec(api, max_retries=1), request(f"fox {trigger}"))
    assert isinstance(result, RowError) and result.type == kind and result.attempts == 2
    assert api.stats()["requests_total"] == 2


@pytest.mark.parametrize("pipeline", ["text2image", "imageedit"])
def test_refusal_is_a_row_error_without_retry(api, pipeline):
    [result] = run(spec(api, pipeline), request("fox [[refuse]]", images=[image_input()]))
    assert isinstance(result, RowError) and result.type == "Refusal" and result.attempts == 1
    assert "safety system" in result.message and api.stats()["requests_total"] == 1


def test_hang_times_out_and_is_retried(api):
    [result] = run(spec(api, timeout=0.3, max_retries=1), request("fox [[hang]]"))
    assert isinstance(result, RowError) and result.type == "Timeout" and result.attempts == 2


def test_download_failures_never_crash(api):
    async def go():
        outcomes = []
        for url in [api.url + "/files/nope.png", api.url + "/healthz", "ftp://example.com/x.png",
                    "http://127.0.0.1:9/x.png"]:
            try:
                await download_image(url, timeout=2)
            except (RetryableError, RowFailure) as exc:
                outcomes.append((type(exc).__name__, exc.kind))
        data = png()
        data_url = f"data:image/png;base64,{base64.b64encode(data).decode()}"
        assert await download_image(data_url, timeout=2) == data
        return outcomes
    outcomes = asyncio.run(go())
    assert outcomes == [("RowFailure", "DownloadFailed"), ("RetryableError", "MalformedResponse"),
                        ("RowFailure", "DownloadFailed"), ("RetryableError", "ConnectionError")]


def test_download_over_the_byte_limit_fails_the_row(api):
    [first] = run(spec(api, model="dall-e-2", response_format="url"), request())
    assert isinstance(first, Response)

    async def go():
        # The fake keeps the file under its digest; fetch it again under a tiny limit.
        url = f"{api.url}/files/{hashlib.sha256(first.images[0]).hexdigest()[:32]}.png"
        with pytest.raises(RowFailure, match="byte limit"):
            await download_image(url, timeout=2, max_bytes=10)
    asyncio.run(go())


# ----- base URL ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/", "/v1/images/generations"])
def test_api_url_with_or_without_v1(api, suffix):
    [result] = run(spec(api, api_url=api.url + suffix), request())
    assert isinstance(result, Response)
    assert api.requests()[0]["path"] == "/v1/images/generations"


def test_df_base_url_is_used_without_flag(api, monkeypatch):
    monkeypatch.setenv("DF_BASE_URL", api.url)
    [result] = run(RunSpec(run_id="t", pipeline="text2image", serving="openai-images",
                           options={"model": "gpt-image-1-mini"}), request())
    assert isinstance(result, Response) and api.requests()[0]["auth"] == "Authorization"


# ----- end to end --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pipeline, key, model", [("text2image", "images", "gpt-image-1.5"),
                                                   ("imageedit", "edited_images", "gpt-image-1.5")])
def test_run_local_end_to_end(api, tmp_path, pipeline, key, model):
    summary = run_local(RunRequest(pipeline=pipeline, serving="openai-images",
                                   input=str(FIXTURES / f"{pipeline}.jsonl"), output=str(tmp_path),
                                   options={"api_url": api.url + "/v1", "model": model}), workers=1)
    [run_dir] = [p for p in tmp_path.iterdir() if p.is_dir()]
    rows = [json.loads(line) for line in (run_dir / "result.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and not any("error" in r for r in rows), rows
    for row_id, row in enumerate(rows):
        [path] = row[key]
        assert path == f"images/{row_id}/0.png"  # relative to the run's folder
        assert decodes((run_dir / path).read_bytes()).format == "PNG"
    endpoint = "images.generations" if pipeline == "text2image" else "images.edits"
    assert api.stats()["by_endpoint"] == {endpoint: 2}
    assert summary is not None


def test_connection_refused_is_retryable_once_answered(api):
    [result] = run(spec(api, api_url="http://127.0.0.1:9", max_retries=1), request(), answered=True)
    # The SDK's aiohttp transport reports a refused connection as a connect timeout; the record names it.
    assert isinstance(result, RowError) and result.type == "ConnectionRefused"
    assert "127.0.0.1" in result.message
    assert result.attempts == 2
