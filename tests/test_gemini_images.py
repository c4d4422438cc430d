"""gemini-images through the real google-genai SDK against the fake API server."""

from __future__ import annotations

import io
import json
import time

import pytest
from google.genai import errors as genai_errors
from PIL import Image

from dfk8s.errors import SpecError, SystematicFailure
from dfk8s.executors.local.launch import run_local
from dfk8s.plan.launch import RunRequest
from dfk8s.run.spec import RunSpec
from dfk8s.servings.api import RetryableError, RowFailure
from dfk8s.servings.base import ImageInput, Message, Request, Response, RowError
from dfk8s.servings.gemini_images import gemini_errors, split_base_url
from dfk8s.testing.fake_api import FakeAPI, FakeConfig
from tests.conftest import SEED_DOCS as FIXTURES  # noqa: E402
from tests.image_api_helpers import decodes, run

KEY_VARS = ("GEMINI_API_KEY", "GOOGLE_API_KEY", "DF_API_KEY", "OPENAI_API_KEY", "DF_BASE_URL",
            "GOOGLE_GENAI_USE_VERTEXAI", "GOOGLE_CLOUD_PROJECT")


@pytest.fixture(scope="module")
def server():
    with FakeAPI(FakeConfig()) as api:
        yield api


@pytest.fixture
def api(server, monkeypatch):
    server.config = FakeConfig()
    server.reset()
    for name in KEY_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GEMINI_API_KEY", "gm-test")
    return server


def image_input(size=(32, 32), fmt="PNG", color=(10, 200, 10)) -> ImageInput:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return ImageInput(buf.getvalue(), Image.MIME[fmt], f"in.{fmt.lower()}", *size)


def request(prompt="a green owl", images=(), row_id="r0", system=None) -> Request:
    messages = ([Message("system", system)] if system else []) + [Message("user", prompt, tuple(images))]
    return Request(row_id, messages, list(images))


def spec(api, pipeline="text2image", **options) -> RunSpec:
    options.setdefault("api_url", api.url)
    options.setdefault("model", "gemini-2.5-flash-image")
    return RunSpec(run_id="t", pipeline=pipeline, serving="gemini-images", options=options)


# ----- generate and edit ---------------------------------------------------------------------------------


def test_generate_with_aspect_ratio(api):
    [result] = run(spec(api, aspect_ratio="16:9"), request(system="house style: flat"))
    assert isinstance(result, Response) and len(result.images) == 1
    assert decodes(result.images[0]).size == (64, 36)
    assert result.text.startswith("fake gemini: a green owl") and result.meta["finish_reason"] == "STOP"
    [entry] = api.requests()
    assert entry["path"].endswith("/models/gemini-2.5-flash-image:generateContent")
    assert entry["auth"] == "x-goog-api-key" and entry["system"] == "house style: flat"
    config = entry["body"]["generationConfig"]
    assert config == {"responseModalities": ["TEXT", "IMAGE"], "imageConfig": {"aspectRatio": "16:9"}}


def test_edit_gemini_3_pro_with_image_size_and_several_images(api):
    images = [image_input((40, 20)), image_input((16, 16), fmt="JPEG"), image_input((8, 8), fmt="GIF")]
    [result] = run(spec(api, "imageedit", model="gemini-3-pro-image-preview", image_size="2k"),
                   request("make it night", images))
    assert isinstance(result, Response) and decodes(result.images[0]).size == (64, 32)  # first image's shape
    [entry] = api.requests()
    assert entry["n_images"] == 3 and entry["image_mimes"] == ["image/png", "image/jpeg", "image/png"]
    assert entry["body"]["generationConfig"]["imageConfig"] == {"imageSize": "2K"}
    [content] = entry["body"]["contents"]
    assert content["role"] == "user" and content["parts"][0] == {"text": "make it night"}


def test_multi_turn_conversation_keeps_roles_and_images_on_their_turn(api):
    img = image_input()
    messages = [Message("system", "be brief"), Message("user", "draw a cat", (img,)),
                Message("assistant", "here is a cat"), Message("user", "now make it orange")]
    [result] = run(spec(api, "imageedit"), Request("r", messages, [img]))
    assert isinstance(result, Response)
    [entry] = api.requests()
    contents = entry["body"]["contents"]
    assert [c["role"] for c in contents] == ["user", "model", "user"]
    assert [len(c["parts"]) for c in contents] == [2, 1, 1]  # the image rides on the first user turn
    assert "inlineData" in contents[0]["parts"][1]
    assert entry["body"]["systemInstruction"]["parts"] == [{"text": "be brief"}]
    assert entry["prompt"] == "now make it orange"
    assert result.text.startswith("fake gemini: now make it orange")


# ----- per-model option checks --------------------------------------------------------------------------


@pytest.mark.parametrize("options, words", [
    ({"image_size": "2K"}, ["gemini-2.5-flash-image takes no image size", "gemini-3-pro-image-preview"]),
    ({"aspect_ratio": "7:3"}, ["gemini-2.5-flash-image", "7:3", "1:1, 2:3", "21:9"]),
    ({"model": "gemini-3-pro-image-preview", "image_size": "8K"}, ["8K", "1K, 2K, 4K"]),
    ({"model": "gemini-3-pro-image-preview", "aspect_ratio": "1:2"}, ["1:2", "4:5"]),
    ({"images_per_prompt": 2}, ["one image per request"]),
    ({"mask": "/m.png"}, ["no mask"]),
])
def test_bad_options_fail_before_any_request(api, options, words):
    with pytest.raises(SpecError) as info:
        run(spec(api, **options), request())
    assert "\n" not in str(info.value) and all(w in str(info.value) for w in words), str(info.value)
    assert api.stats()["requests_total"] == 0


def test_unknown_model_passes_options_through(api):
    [result] = run(spec(api, model="gemini-9-image", aspect_ratio="7:3", image_size="3K"), request())
    assert isinstance(result, Response)
    config = api.requests()[0]["body"]["generationConfig"]
    assert config["imageConfig"] == {"aspectRatio": "7:3", "imageSize": "3K"}


@pytest.mark.parametrize("var", ["GEMINI_API_KEY", "GOOGLE_API_KEY", "DF_API_KEY"])
def test_key_from_any_of_the_variables(api, monkeypatch, var):
    monkeypatch.delenv("GEMINI_API_KEY")
    monkeypatch.setenv(var, "k")
    [result] = run(spec(api), request())
    assert isinstance(result, Response)


def test_missing_key_is_a_spec_error(api, monkeypatch):
    monkeypatch.delenv("GEMINI_API_KEY")
    with pytest.raises(SpecError, match="GEMINI_API_KEY or GOOGLE_API_KEY or DF_API_KEY"):
        run(spec(api), request())


def test_row_without_prompt_fails_without_request(api):
    [result] = run(spec(api), request(""))
    assert isinstance(result, RowError) and result.type == "BadInput"
    assert api.stats()["requests_total"] == 0


# ----- faults ------------------------------------------------------------------------------------------


def test_429_retry_after_is_honoured_with_exact_counts(api):
    api.configure(fail_first=2, retry_after=0.3)
    started = time.monotonic()
    [result] = run(spec(api), request(), no_wait=False)
    assert isinstance(result, Response) and result.attempts == 3
    assert time.monotonic() - started >= 0.6
    stats = api.stats()
    assert stats["requests_total"] == 3 and stats["by_status"] == {"429": 2, "200": 1}


def test_5xx_is_retried_until_success(api):
    api.configure(rate_5xx=0.5, seed=5)
    results = run(spec(api, max_retries=8), *(request(f"owl {i}", row_id=str(i)) for i in range(8)))
    assert all(isinstance(r, Response) for r in results)
    stats = api.stats()
    faults = sum(stats["faults"].values())
    assert faults > 0 and sum(r.attempts for r in results) == stats["requests_total"] == 8 + faults


@pytest.mark.parametrize("trigger, kind", [("[[malformed]]", "MalformedResponse"), ("[[500]]", "ServerError"),
                                           ("[[empty]]", "EmptyResponse"), ("[[429]]", "RateLimited")])
def test_retryable_faults_give_up_after_max_retries(api, trigger, kind):
    api.configure(retry_after=0)
    [result] = run(spec(api, max_retries=1), request(f"owl {trigger}"))
    assert isinstance(result, RowError) and result.type == kind and result.attempts == 2
    assert api.stats()["requests_total"] == 2


def test_hang_times_out_and_is_retried(api):
    [result] = run(spec(api, timeout=0.3, max_retries=1), request("owl [[hang]]"))
    assert isinstance(result, RowError) and result.type == "Timeout" and result.attempts == 2


def test_safety_finish_is_a_refusal_keeping_finish_reason(api):
    [result] = run(spec(api), request("owl [[refuse]]"))
    assert isinstance(result, RowError) and result.type == "Refusal" and result.attempts == 1
    record = result.to_record()
    assert record["finish_reason"] == "SAFETY" and record["text"] is None
    assert record["blocked_categories"] == ["HARM_CATEGORY_DANGEROUS_CONTENT"]


def test_blocked_prompt_is_a_refusal(api):
    [result] = run(spec(api), request("owl [[block]]"))
    assert isinstance(result, RowError) and result.type == "Refusal" and "blocked (SAFETY)" in result.message
    assert result.details["block_reason"] == "SAFETY" and api.stats()["requests_total"] == 1


def test_text_only_answer_keeps_the_text(api):
    [result] = run(spec(api), request("owl [[text_only]]"))
    assert isinstance(result, RowError) and result.type == "NoImage" and result.attempts == 1
    record = result.to_record()
    assert record["finish_reason"] == "STOP" and record["text"].startswith("fake gemini: owl")


# A bad key, model or path fails the row as "systematic": the serving's breaker trips on it at once.
@pytest.mark.parametrize("code, body, outcome", [
    (401, {"error": {"code": 401, "status": "UNAUTHENTICATED"}}, "AuthenticationError"),
    (403, {"error": {"code": 403, "status": "PERMISSION_DENIED"}}, "PermissionDenied"),
    (400, {"error": {"code": 400, "message": "API key not valid.", "status": "INVALID_ARGUMENT",
                     "details": [{"reason": "API_KEY_INVALID"}]}}, "AuthenticationError"),
    (404, {"error": {"code": 404, "message": "models/x is not found", "status": "NOT_FOUND"}},
     "ModelNotFound"),
    (400, {"error": {"code": 400, "message": "bad image", "status": "INVALID_ARGUMENT"}}, RowFailure),
    (429, {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "details": [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}]}}, RetryableError),
    (503, {"error": {"code": 503, "status": "UNAVAILABLE"}}, RetryableError),
])
def test_error_mapping(code, body, outcome):
    if isinstance(outcome, str):
        with pytest.raises(RowFailure) as info, gemini_errors("m"):
            raise genai_errors.APIError.raise_error(code, body, None)
        assert info.value.kind == outcome and info.value.systematic
        return
    with pytest.raises(outcome) as info, gemini_errors("m"):
        raise genai_errors.APIError.raise_error(code, body, None)
    if code == 429:
        assert info.value.retry_after == 7.0
    if outcome is RowFailure:
        assert info.value.kind == "BadRequest" and "bad image" in str(info.value)


# ----- base URL ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix, path", [("", None), ("/", None), ("/v1beta", "/v1beta/"), ("/v1", "/v1/"),
                                          ("/v1beta/models/x:generateContent", "/v1beta/")])
def test_api_url_with_or_without_version(api, suffix, path):
    [result] = run(spec(api, api_url=api.url + suffix), request())
    assert isinstance(result, Response)
    got = api.requests()[0]["path"]
    assert got.endswith("/models/gemini-2.5-flash-image:generateContent") and "/v1beta/v1beta" not in got
    if path:
        assert got.startswith(path)


def test_split_base_url():
    assert split_base_url("https://px.example/gemini/v1beta/") == ("https://px.example/gemini", "v1beta")
    assert split_base_url("https://proxy.example/gemini") == ("https://proxy.example/gemini", None)
    assert split_base_url("http://h:1/v1alpha/models/m:generateContent") == ("http://h:1", "v1alpha")
    assert split_base_url(None) == (None, None)


def test_df_base_url_is_used_without_flag(api, monkeypatch):
    monkeypatch.setenv("DF_BASE_URL", api.url + "/v1beta")
    [result] = run(RunSpec(run_id="t", pipeline="text2image", serving="gemini-images", options={}), request())
    assert isinstance(result, Response) and api.requests()[0]["path"].startswith("/v1beta/")


# ----- end to end --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pipeline, key", [("text2image", "images"), ("imageedit", "edited_images")])
def test_run_local_end_to_end(api, tmp_path, pipeline, key):
    options = {"api_url": api.url, "model": "gemini-3-pro-image-preview", "aspect_ratio": "4:3",
               "image_size": "1K"}
    manifest = str(FIXTURES / f"{pipeline}.jsonl")
    run_local(RunRequest(pipeline=pipeline, serving="gemini-images", input=manifest, output=str(tmp_path),
                         options=options), workers=1)
    [run_dir] = [p for p in tmp_path.iterdir() if p.is_dir()]
    rows = [json.loads(line) for line in (run_dir / "result.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and not any("error" in r for r in rows), rows
    for row_id, row in enumerate(rows):
        [path] = row[key]
        assert path == f"images/{row_id}/0.png"  # relative to the run's folder
        assert decodes((run_dir / path).read_bytes()).size == (64, 48)
    assert api.stats()["by_endpoint"] == {"gemini.generateContent": 2}
    assert api.stats()["by_status"] == {"200": 2}


def test_connection_refused_is_retryable_once_answered_and_quick(api):
    started = time.monotonic()
    [result] = run(spec(api, api_url="http://127.0.0.1:9", max_retries=1), request(), answered=True)
    assert isinstance(result, RowError) and result.type == "ConnectionRefused" and result.attempts == 2
    assert time.monotonic() - started < 3  # the SDK's own hidden 1-10 s reconnect retry is off
    # Before anything answered, it is a wrong host or port: it trips the breaker at once.
    with pytest.raises(SystematicFailure, match="ConnectionRefused"):
        run(spec(api, api_url="http://127.0.0.1:9", max_retries=1), request())
