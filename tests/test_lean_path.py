"""The lean caption request path (aiohttp + orjson) against the openai SDK, its reference.

Both paths talk to the fake server; it keeps the raw bytes of what each sent, and the tests compare
them byte for byte, then compare what each path made of the same answers (including faults).
"""

import asyncio
import io
import json

import pytest
from openai.types.chat import ChatCompletion
from PIL import Image

from dfk8s.errors import SpecError
from dfk8s.run.spec import RunSpec
from dfk8s.servings.api import RetryableError, RowFailure
from dfk8s.servings.base import ImageInput, Message, Request, RowError
from dfk8s.servings.lean_http import dumps_with_images
from dfk8s.servings.openai_chat import (
    OpenAIChatServing,
    data_url,
    parse_chat_completion_sdk,
    parse_completion,
)
from tests.conftest import DATAFLOW_ROOT

CLIENTS = ("fast", "sdk")


def _serving(url, client, **options):
    spec = RunSpec(run_id="t", pipeline="vqa", serving="openai-chat", shards=1,
                   options={"api_url": url, "client": client, **options})
    return OpenAIChatServing.from_spec(spec)


def _run(serving, requests):
    async def go():
        try:
            return await serving.run(requests)
        finally:
            await serving.aclose()
    return asyncio.run(go())


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, "JPEG")
    return buf.getvalue()


def _requests():
    png = (DATAFLOW_ROOT / "dataflow/example/vqa/ggbond.png").read_bytes()
    tricky = 'quotes " and \\ backslash, ünïcödé, emoji 🦆, \u2028 separator, control \x01\x1f, tab\t, nl\n'
    return [
        Request("text", [Message("user", "describe scene 1")]),
        Request("sys", [Message("system", "You are a caption generator."), Message("user", tricky)]),
        Request("img", [Message("system", "s"), Message("user", "what is this?",
                                                           (ImageInput(png, "image/png", "a.png"),))]),
        Request("two", [Message("user", "", (ImageInput(png, "image/png", "a.png"),
                                             ImageInput(_jpeg(), "image/jpeg", "b.jpg"))),
                        Message("assistant", "a pig"), Message("user", "and now?")]),
    ]


def test_both_paths_send_byte_identical_requests(fake_api, api_key):
    fake_api.configure(keep_bodies=50)
    sent = {}
    for client in CLIENTS:
        fake_api.reset()
        results = _run(_serving(fake_api.url, client, temperature=0.2, max_tokens=64), _requests())
        assert all(r.text and r.text.startswith("fake caption") for r in results), results
        sent[client] = sorted(fake_api.bodies(), key=lambda b: b["body"])  # requests run concurrently
    assert len(sent["fast"]) == len(sent["sdk"]) == 4
    for fast, sdk in zip(sent["fast"], sent["sdk"], strict=True):
        assert fast["body"] == sdk["body"]  # the same bytes, not just the same JSON
        assert (fast["method"], fast["path"], fast["query"]) == (sdk["method"], sdk["path"], sdk["query"])
        for header in ("Authorization", "Content-Type", "Accept"):
            assert fast["headers"][header] == sdk["headers"][header]
    body = json.loads(sent["fast"][0]["body"])
    assert body["temperature"] == 0.2 and body["max_tokens"] == 64


def test_images_are_spliced_into_the_body_as_the_plain_path_would_write_them():
    png = (DATAFLOW_ROOT / "dataflow/example/vqa/ggbond.png").read_bytes()
    images = [ImageInput(png, "image/png", "a"), ImageInput(_jpeg(), "image/jpeg", "b")]

    def body(url):
        return {"model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "x \x00dfk8s-image-0 lookalike"},
            *({"type": "image_url", "image_url": {"url": url(img)}} for img in images)]}]}

    lean = dumps_with_images(lambda slot: body(lambda img: f"data:{img.mime};base64,{slot(img.data)}"))
    plain = json.dumps(body(data_url), ensure_ascii=False, separators=(",", ":")).encode()
    assert lean == plain


_COMPLETIONS = [
    {"id": "a", "object": "chat.completion", "created": 1, "model": "m",
     "choices": [{"index": 0, "finish_reason": "stop",
                  "message": {"role": "assistant", "content": "a cat", "refusal": None}}]},
    {"id": "b", "object": "chat.completion", "created": 1, "model": "m",
     "choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": "a c"}},
                 {"index": 1, "finish_reason": "stop", "message": {"role": "assistant", "content": "two"}}]},
    {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
     "choices": [{"index": 0, "finish_reason": "stop",
                  "message": {"role": "assistant", "content": None, "refusal": "I can't."}}]},
    {"id": "d", "object": "chat.completion", "created": 1, "model": "m",
     "choices": [{"index": 0, "finish_reason": "content_filter",
                  "message": {"role": "assistant", "content": ""}}]},
    {"id": "e", "object": "chat.completion", "created": 1, "model": "m", "choices": []},
]


def _outcome(parse, value):
    try:
        response = parse(value)
    except (RetryableError, RowFailure) as exc:
        return type(exc).__name__, exc.kind, str(exc), getattr(exc, "details", {})
    return "ok", response.text, response.meta


@pytest.mark.parametrize("completion", _COMPLETIONS, ids=[c["id"] for c in _COMPLETIONS])
def test_the_lean_reading_matches_the_sdk_models(completion):
    validated = ChatCompletion.model_validate(completion)  # the SDK's own model, strictly validated
    assert _outcome(parse_completion, completion) == _outcome(parse_chat_completion_sdk, validated)


FAULTS = [
    ("refusal", {}, "please [[refuse]]"),
    ("empty", {"rate_empty": 1.0}, "x"),
    ("malformed", {}, "x [[malformed]]"),
    ("500", {}, "x [[500]]"),
    ("429", {"fail_first": 5, "retry_after": 0.01}, "x"),
    ("length", {}, "a long prompt with many words in it"),
]


@pytest.mark.parametrize(("name", "knobs", "text"), FAULTS, ids=[f[0] for f in FAULTS])
def test_both_paths_give_the_same_result_for_the_same_answer(fake_api, api_key, name, knobs, text):
    results = {}
    for client in CLIENTS:
        fake_api.reset()
        fake_api.configure(**knobs)
        extra = {"max_tokens": 3} if name == "length" else {}
        [result] = _run(_serving(fake_api.url, client, max_retries=1, **extra),
                        [Request("r", [Message("user", text)])])
        results[client] = result
    assert results["fast"] == results["sdk"]


def test_server_messages_are_kept_in_error_records_on_both_paths(fake_api, api_key):
    for client in CLIENTS:
        fake_api.reset()
        fake_api.configure(fail_first=5, retry_after=0.01)
        [limited] = _run(_serving(fake_api.url, client, max_retries=1),
                         [Request("r", [Message("user", "x")])])
        assert limited.type == "RateLimited" and "Rate limit reached (fake)" in limited.message
        assert limited.details["status"] == 429
        [failed] = _run(_serving(fake_api.url, client, max_retries=0),
                        [Request("r", [Message("user", "x [[500]]")])])
        assert failed.type == "ServerError"
        assert "HTTP 500: The server had an error while processing your request." in failed.message


def test_unknown_client_is_refused_before_any_request(fake_api, api_key):
    with pytest.raises(SpecError, match="--client"):
        _serving(fake_api.url, "curl")


@pytest.mark.parametrize("client", CLIENTS)
def test_retry_waits_see_the_rows_own_attempt_numbers(fake_api, api_key, client):
    # The first attempt runs outside tenacity; backoff must still grow 1, 2, 3 as if it had not.
    fake_api.configure(fail_first=3, retry_after=0.01)
    serving = _serving(fake_api.url, client, max_retries=4)
    seen = []

    def wait(state):
        seen.append((state.attempt_number, type(state.outcome.exception()).__name__))
        return 0

    serving.wait = wait
    [result] = _run(serving, [Request("r", [Message("user", "x")])])
    assert result.attempts == 4 and result.text
    assert seen == [(1, "RetryableError"), (2, "RetryableError"), (3, "RetryableError")]


# ----- gemini-images: the lean path against google-genai ------------------------------------------------


def _gemini(url, client, pipeline="imageedit", **options):
    from dfk8s.servings.gemini_images import GeminiImagesServing

    spec = RunSpec(run_id="t", pipeline=pipeline, serving="gemini-images", shards=1,
                   options={"api_url": url, "client": client, **options})
    return GeminiImagesServing.from_spec(spec)


def _gemini_requests():
    png = (DATAFLOW_ROOT / "dataflow/example/vqa/ggbond.png").read_bytes()
    gif = io.BytesIO()
    Image.new("RGB", (20, 20), (1, 2, 3)).save(gif, "GIF")  # sent as PNG, on both paths
    return [
        Request("t", [Message("user", "a red fox, ünï 🦊")]),
        Request("s", [Message("system", "be brief"), Message("user", "make it \"red\"",
                                                                  (ImageInput(png, "image/png", "a"),)),
                      Message("assistant", "ok"), Message("user", "more")]),
        Request("g", [Message("user", "edit", (ImageInput(gif.getvalue(), "image/gif", "g"),
                                               ImageInput(_jpeg(), "image/jpeg", "j")))]),
    ]


def test_gemini_paths_send_byte_identical_requests(fake_api, monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", "gk")
    fake_api.configure(keep_bodies=50)
    sent = {}
    for client in CLIENTS:
        fake_api.reset()
        results = _run(_gemini(fake_api.url, client, temperature=0.5, aspect_ratio="4:3"), _gemini_requests())
        assert all(r.images for r in results), results
        sent[client] = sorted(fake_api.bodies(), key=lambda b: b["body"])
    assert len(sent["fast"]) == len(sent["sdk"]) == 3
    for fast, sdk in zip(sent["fast"], sent["sdk"], strict=True):
        assert fast["body"] == sdk["body"]
        assert (fast["method"], fast["path"], fast["query"]) == (sdk["method"], sdk["path"], sdk["query"])
        for header in ("x-goog-api-key", "Content-Type", "X-Server-Timeout"):
            assert fast["headers"][header] == sdk["headers"][header]


GEMINI_FAULTS = [
    ("text_only", {}, "owl [[text_only]]"),
    ("block", {}, "owl [[block]]"),
    ("refusal", {}, "owl [[refuse]]"),
    ("empty", {"rate_empty": 1.0}, "owl"),
    ("malformed", {}, "owl [[malformed]]"),
    ("500", {}, "owl [[500]]"),
    ("429", {"fail_first": 5, "retry_after": 0.01}, "owl"),
]


@pytest.mark.parametrize(("name", "knobs", "text"), GEMINI_FAULTS, ids=[f[0] for f in GEMINI_FAULTS])
def test_gemini_paths_give_the_same_result(fake_api, monkeypatch, name, knobs, text):
    monkeypatch.setenv("GEMINI_API_KEY", "gk")
    results = {}
    for client in CLIENTS:
        fake_api.reset()
        fake_api.configure(**knobs)
        [results[client]] = _run(_gemini(fake_api.url, client, "text2image", max_retries=1),
                                 [Request("r", [Message("user", text)])])
    assert results["fast"] == results["sdk"]
    assert isinstance(results["fast"], RowError)  # every one of these faults fails the row


@pytest.mark.parametrize("client", CLIENTS)
def test_gemini_unknown_model_and_bad_key_trip_the_breaker(fake_api, monkeypatch, client):
    from dfk8s.errors import SystematicFailure

    monkeypatch.setenv("GEMINI_API_KEY", "gk")
    fake_api.configure(models="gemini-2.5-flash-image")
    with pytest.raises(SystematicFailure) as info:
        _run(_gemini(fake_api.url, client, "text2image", model="gemini-2.5-flash-imag"),
             [Request(str(i), [Message("user", "owl")]) for i in range(20)])
    assert info.value.type == "ModelNotFound" and fake_api.stats()["requests_total"] <= 5
    fake_api.reset()
    fake_api.configure(models="", api_key="right")
    with pytest.raises(SystematicFailure) as info:
        _run(_gemini(fake_api.url, client, "text2image"), [Request(str(i), [Message("user", "owl")])
                                                            for i in range(20)])
    assert info.value.type == "AuthenticationError" and "API key not valid" in info.value.message


_GEMINI_ANSWERS = [
    {"candidates": [{"content": {"role": "model", "parts": [
        {"text": "a draft", "thought": True}, {"text": "here"},
        {"inlineData": {"mimeType": "image/png", "data": None}}]}, "finishReason": "STOP"}]},
    {"candidates": [{"finishReason": "IMAGE_SAFETY", "safetyRatings": [
        {"category": "HARM_CATEGORY_HARASSMENT", "blocked": True}]}]},
    {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT", "blockReasonMessage": "no"}},
    {"candidates": []},
    {"candidates": [{"content": {"role": "model", "parts": [{"text": "only words"}]},
                     "finishReason": "MAX_TOKENS"}]},
]


@pytest.mark.parametrize("answer", _GEMINI_ANSWERS)
def test_gemini_lean_reading_matches_the_sdk_models(monkeypatch, answer):
    from google.genai import types

    from dfk8s.servings.gemini_images import _b64, _View

    monkeypatch.setenv("GEMINI_API_KEY", "gk")
    serving = _gemini("http://127.0.0.1:9", "fast", "text2image")
    validated = types.GenerateContentResponse.model_validate(answer)
    assert _outcome(lambda a: serving._response(_View(a), _b64), answer) == \
        _outcome(lambda a: serving._response(a, lambda d: d), validated)
