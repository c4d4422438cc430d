"""The fake API server answers the real openai and google-genai SDKs, and its fault knobs do what they say."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from PIL import Image

from dfk8s.testing.fake_api import FakeAPI, FakeConfig
from dfk8s.testing.fake_api._wire import make_png

ROOT = Path(__file__).resolve().parents[1]
SECRET = "sk-fake-secret-0123456789"


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (32, 16), color: tuple = (200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def decode_png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.format == "PNG"
    return img


def http_json(url: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server():
    with FakeAPI(FakeConfig()) as api:
        yield api


@pytest.fixture
def api(server: FakeAPI) -> FakeAPI:
    server.config = FakeConfig()  # every test starts from default knobs and zero counters
    server.reset()
    return server


@pytest.fixture
def oai(api: FakeAPI) -> openai.OpenAI:
    return openai.OpenAI(base_url=api.url + "/v1", api_key=SECRET, max_retries=0, timeout=10)


@pytest.fixture
def gem(api: FakeAPI) -> genai.Client:
    options = types.HttpOptions(base_url=api.url, timeout=10_000,
                                retry_options=types.HttpRetryOptions(attempts=1))
    return genai.Client(api_key=SECRET, http_options=options)


def chat(client: openai.OpenAI, text: str, *images: str, **kw):
    content = [{"type": "text", "text": text}]
    content += [{"type": "image_url", "image_url": {"url": u}} for u in images]
    messages = [{"role": "user", "content": content}]
    return client.chat.completions.create(model="gpt-4o-mini", messages=messages, **kw)


# ----- OpenAI chat completions ---------------------------------------------------------------------------


def test_chat_caption_reports_images_and_records_request(api, oai):
    question = [{"type": "text", "text": "Describe this image."},
                {"type": "image_url", "image_url": {"url": data_url(image_bytes())}}]
    r = oai.chat.completions.create(
        model="gpt-4o-mini", temperature=0.2, max_tokens=300,
        messages=[{"role": "system", "content": "You caption images."},
                  {"role": "user", "content": question}])
    assert r.choices[0].message.content == \
        "fake caption: Describe this image. (images: 1, 32x16 png; system: yes)"
    assert r.choices[0].finish_reason == "stop" and r.usage.total_tokens > 0 and r.model == "gpt-4o-mini"
    [entry] = api.requests()
    assert entry["system"] == "You caption images." and entry["n_images"] == 1
    assert entry["image_mimes"] == ["image/png"] and entry["auth"] == "Authorization"
    assert entry["body"]["temperature"] == 0.2 and entry["body"]["max_tokens"] == 300
    assert "<image>" not in json.dumps(entry["body"])
    sent_url = entry["body"]["messages"][1]["content"][1]["image_url"]["url"]
    assert sent_url.startswith("data:image/png;base64,<")
    assert SECRET not in json.dumps(api.requests()) + json.dumps(api.stats())  # the key is never kept
    assert api.stats()["by_endpoint"] == {"chat.completions": 1} and api.stats()["by_status"] == {"200": 1}


def test_chat_string_content_several_images_and_length(api, oai):
    r = oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "plain text prompt"}])
    assert r.choices[0].message.content == "fake caption: plain text prompt (images: 0; system: no)"
    r = chat(oai, "two", data_url(image_bytes()), data_url(image_bytes("JPEG", (8, 8)), "image/jpeg"))
    assert "(images: 2, 32x16 png, 8x8 jpeg; system: no)" in r.choices[0].message.content
    r = chat(oai, "cut me short", max_tokens=3)
    assert r.choices[0].finish_reason == "length" and len(r.choices[0].message.content.split()) == 3


@pytest.mark.parametrize("url,code", [
    (data_url(b"definitely not an image"), "invalid_image"),
    (data_url(image_bytes("PNG"), "image/jpeg"), "invalid_image_format"),
    ("data:image/png;base64,@@@not-base64@@@", "invalid_image"),
    ("https://example.com/cat.png", "invalid_image_url"),
])
def test_chat_rejects_bad_images_with_openai_error(api, oai, url, code):
    with pytest.raises(openai.BadRequestError) as err:
        chat(oai, "describe", url)
    assert err.value.code == code and err.value.type == "invalid_request_error"
    assert set(err.value.body) == {"message", "type", "param", "code"}
    assert api.stats()["by_status"] == {"400": 1}


def test_paths_without_v1_prefix_are_served(api):
    client = openai.OpenAI(base_url=api.url, api_key="k", max_retries=0)
    assert chat(client, "no prefix").choices[0].message.content.startswith("fake caption: no prefix")
    assert api.requests()[0]["path"] == "/chat/completions"


# ----- OpenAI images -------------------------------------------------------------------------------------


def test_generate_b64_png_deterministic_by_prompt(api, oai):
    a = oai.images.generate(model="gpt-image-1", prompt="a red fox", size="1536x1024", n=2)
    again = oai.images.generate(model="gpt-image-1", prompt="a red fox", size="1536x1024", n=2)
    other = oai.images.generate(model="gpt-image-1", prompt="a blue fox", size="1536x1024", n=2)
    pngs = [base64.b64decode(d.b64_json) for d in a.data]
    assert [decode_png(p).size for p in pngs] == [(64, 43), (64, 43)]
    assert pngs[0] != pngs[1]  # n images differ from each other
    assert pngs == [base64.b64decode(d.b64_json) for d in again.data]
    assert pngs[0] != base64.b64decode(other.data[0].b64_json)
    assert a.usage.total_tokens > 0 and a.data[0].url is None and a.data[0].revised_prompt is None
    assert make_png("k", 64, 64) == make_png("k", 64, 64)


def test_generate_url_is_downloadable(api, oai):
    r = oai.images.generate(model="dall-e-3", prompt="a lighthouse", response_format="url")
    assert r.data[0].revised_prompt == "fake revised prompt: a lighthouse" and r.data[0].b64_json is None
    with urllib.request.urlopen(r.data[0].url, timeout=5) as response:
        assert response.headers["content-type"] == "image/png"
        assert decode_png(response.read()).size == (64, 64)
    assert api.stats()["files_served"] == 1 and api.stats()["requests_total"] == 1
    b64 = oai.images.generate(model="dall-e-2", prompt="x", response_format="b64_json")
    decode_png(base64.b64decode(b64.data[0].b64_json))


def test_edit_multiple_images_and_mask(api, oai):
    src = image_bytes(size=(40, 20))
    r = oai.images.edit(model="gpt-image-1", prompt="merge them",
                        image=[("a.png", src, "image/png"),
                               ("b.jpg", image_bytes("JPEG", (8, 8)), "image/jpeg")],
                        mask=("m.png", image_bytes(size=(40, 20), color=(0, 0, 0)), "image/png"))
    assert decode_png(base64.b64decode(r.data[0].b64_json)).size == (64, 32)  # first image's shape
    [entry] = api.requests()
    assert entry["n_images"] == 2 and entry["has_mask"] is True
    assert [f["field"] for f in entry["body"]["files"]] == ["image[]", "image[]", "mask"]
    one = oai.images.edit(model="dall-e-2", prompt="one", image=("a.png", src, "image/png"), n=2)
    assert len(one.data) == 2 and all(d.url for d in one.data)
    assert api.requests()[-1]["n_images"] == 1 and api.requests()[-1]["has_mask"] is False


@pytest.mark.parametrize("kwargs,code", [
    ({"image": ("a.png", b"not a png", "image/png")}, "invalid_image"),
    ({"image": ("a.png", image_bytes("JPEG"), "image/png")}, "invalid_image_format"),
    ({"image": image_bytes()}, "invalid_value"),  # raw bytes go up as application/octet-stream
    ({"image": ("a.png", image_bytes(size=(40, 20)), "image/png"),
      "mask": ("m.png", image_bytes(size=(10, 10)), "image/png")}, "invalid_value"),
])
def test_edit_rejects_bad_inputs(api, oai, kwargs, code):
    with pytest.raises(openai.BadRequestError) as err:
        oai.images.edit(model="gpt-image-1", prompt="p", **kwargs)
    assert err.value.code == code


# ----- Gemini --------------------------------------------------------------------------------------------


def test_gemini_text_and_image(api, gem):
    r = gem.models.generate_content(
        model="gemini-2.5-flash-image",
        contents=["make it blue", types.Part.from_bytes(data=image_bytes(), mime_type="image/png")],
        config=types.GenerateContentConfig(response_modalities=["TEXT", "IMAGE"],
                                           system_instruction="be bold",
                                           image_config=types.ImageConfig(aspect_ratio="16:9")))
    parts = r.candidates[0].content.parts
    assert parts[0].text == "fake gemini: make it blue (turns: 1, images: 1, 32x16 png; system: yes)"
    assert parts[1].inline_data.mime_type == "image/png"
    assert decode_png(parts[1].inline_data.data).size == (64, 36)
    assert r.candidates[0].finish_reason == types.FinishReason.STOP and r.usage_metadata.total_token_count > 0
    [entry] = api.requests()
    assert entry["endpoint"] == "gemini.generateContent" and entry["model"] == "gemini-2.5-flash-image"
    assert entry["auth"] == "x-goog-api-key" and entry["system"] == "be bold"
    assert entry["image_mimes"] == ["image/png"]
    assert SECRET not in json.dumps(api.requests())


def test_gemini_v1beta_path_and_snake_case_json(api):
    blob = {"mime_type": "image/png", "data": base64.b64encode(image_bytes()).decode()}
    body = {"contents": [{"role": "user", "parts": [{"text": "snake"}, {"inline_data": blob}]}],
            "generation_config": {"response_modalities": ["TEXT", "IMAGE"],
                                  "image_config": {"aspect_ratio": "1:2"}}}
    r = http_json(api.url + "/v1beta/models/gemini-2.5-flash-image:generateContent?key=" + SECRET, body)
    parts = r["candidates"][0]["content"]["parts"]
    assert parts[0]["text"].startswith("fake gemini: snake (turns: 1, images: 1, 32x16 png")
    assert decode_png(base64.b64decode(parts[1]["inlineData"]["data"])).size == (32, 64)
    assert api.requests()[0]["auth"] == "key query parameter" and SECRET not in json.dumps(api.requests())
    with pytest.raises(urllib.error.HTTPError) as err:
        http_json(api.url + "/v1beta/models/gemini-2.5-flash:streamGenerateContent", body)
    assert err.value.code == 404 and json.loads(err.value.read())["error"]["status"] == "NOT_FOUND"


def test_gemini_multi_turn_and_modalities(api, gem):
    jpeg = types.Part.from_bytes(data=image_bytes("JPEG"), mime_type="image/jpeg")
    turns = [types.Content(role="user", parts=[types.Part(text="first")]),
             types.Content(role="model", parts=[types.Part(text="ok")]),
             types.Content(role="user", parts=[types.Part(text="second"), jpeg])]
    r = gem.models.generate_content(model="gemini-2.5-flash", contents=turns)
    assert r.text == "fake gemini: second (turns: 3, images: 1, 32x16 jpeg; system: no)"
    assert len(r.candidates[0].content.parts) == 1  # a text model sends no image unless asked
    only = gem.models.generate_content(model="gemini-2.5-flash-image", contents="pic",
                                       config=types.GenerateContentConfig(response_modalities=["IMAGE"]))
    [part] = only.candidates[0].content.parts
    assert decode_png(part.inline_data.data).size == (64, 64)


@pytest.mark.parametrize("data,mime", [(b"garbage", "image/png"), (image_bytes("PNG"), "image/jpeg")])
def test_gemini_rejects_bad_image(api, gem, data, mime):
    with pytest.raises(genai_errors.ClientError) as err:
        gem.models.generate_content(model="gemini-2.5-flash",
                                    contents=["x", types.Part.from_bytes(data=data, mime_type=mime)])
    assert err.value.code == 400 and err.value.status == "INVALID_ARGUMENT"


# ----- faults --------------------------------------------------------------------------------------------


def test_429_carries_retry_after_in_both_shapes(api, oai, gem):
    api.configure(rate_429=1.0, retry_after=7)
    with pytest.raises(openai.RateLimitError) as err:
        chat(oai, "hi")
    assert err.value.response.headers["retry-after"] == "7" and err.value.code == "rate_limit_exceeded"
    with pytest.raises(genai_errors.ClientError) as gerr:
        gem.models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert gerr.value.code == 429 and gerr.value.status == "RESOURCE_EXHAUSTED"
    assert gerr.value.response.headers["retry-after"] == "7"
    assert gerr.value.details["error"]["details"] == [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}]
    api.configure(retry_after=0.25)
    with pytest.raises(openai.RateLimitError) as err:
        oai.images.generate(model="gpt-image-1", prompt="p")
    assert err.value.response.headers["retry-after"] == "0.25"
    stats = api.stats()
    assert stats["retry_after_sent"] == [7.0, 7.0, 0.25] and stats["faults"] == {"429": 3}
    assert stats["by_status"] == {"429": 3}


def test_5xx_and_content_triggers(api, oai, gem):
    api.configure(rate_5xx=1.0)
    with pytest.raises(openai.InternalServerError) as err:
        chat(oai, "x")
    assert err.value.status_code in (500, 503)
    with pytest.raises(genai_errors.ServerError) as gerr:
        gem.models.generate_content(model="gemini-2.5-flash", contents="x")
    assert gerr.value.status in ("INTERNAL", "UNAVAILABLE")
    api.configure(rate_5xx=0.0)
    with pytest.raises(openai.InternalServerError) as err:
        chat(oai, "row 7 [[500]]")
    assert err.value.status_code == 500
    assert chat(oai, "row 8").choices  # only the tagged prompt fails


def test_malformed_body_reaches_sdks_as_json_errors(api, oai, gem):
    with pytest.raises(json.JSONDecodeError):
        chat(oai, "[[malformed]]")
    api.configure(rate_malformed=1.0)
    with pytest.raises(json.JSONDecodeError):
        oai.images.generate(model="gpt-image-1", prompt="p")
    with pytest.raises(json.JSONDecodeError):
        gem.models.generate_content(model="gemini-2.5-flash", contents="x")
    assert api.stats()["by_status"] == {"200": 3} and api.stats()["faults"] == {"malformed": 3}


def test_empty_results(api, oai, gem):
    api.configure(rate_empty=1.0)
    assert chat(oai, "x").choices == []
    assert oai.images.generate(model="gpt-image-1", prompt="p").data == []
    r = gem.models.generate_content(model="gemini-2.5-flash-image", contents="x")
    assert r.candidates == [] and r.text is None


def test_refusals_and_safety(api, oai, gem):
    msg = chat(oai, "please [[refuse]]").choices[0].message
    assert msg.content is None and msg.refusal
    with pytest.raises(openai.BadRequestError) as err:
        oai.images.generate(model="dall-e-3", prompt="[[refuse]]")
    assert err.value.code == "content_policy_violation"
    api.configure(rate_refusal=1.0)
    r = gem.models.generate_content(model="gemini-2.5-flash-image", contents="x",
                                    config=types.GenerateContentConfig(response_modalities=["TEXT", "IMAGE"]))
    assert r.candidates[0].finish_reason == types.FinishReason.SAFETY and r.candidates[0].content is None
    api.configure(rate_refusal=0.0)
    blocked = gem.models.generate_content(model="gemini-2.5-flash-image", contents="x [[block]]")
    assert blocked.prompt_feedback.block_reason == types.BlockedReason.SAFETY and not blocked.candidates


def test_gemini_text_only_answer(api, gem):
    api.configure(text_only=1.0)
    r = gem.models.generate_content(model="gemini-2.5-flash-image", contents="draw",
                                    config=types.GenerateContentConfig(response_modalities=["TEXT", "IMAGE"]))
    [part] = r.candidates[0].content.parts
    assert part.text.startswith("fake gemini: draw")
    assert r.candidates[0].finish_reason == types.FinishReason.STOP


def test_counted_triggers_fail_one_request_n_times_then_let_it_through(api, oai):
    api.configure(retry_after=0)
    for _ in range(3):
        with pytest.raises(openai.InternalServerError) as err:
            chat(oai, "row 1 [[500x3]]")
        assert err.value.status_code == 500
    assert chat(oai, "row 1 [[500x3]]").choices[0].message.content.startswith("fake caption")
    assert chat(oai, "row 2").choices  # an untagged prompt is not touched
    with pytest.raises(openai.RateLimitError):
        chat(oai, "row 3 [[429x1]]")
    assert chat(oai, "row 3 [[429x1]]").choices
    assert api.stats()["faults"] == {"500": 3, "429": 1}
    api.reset()  # forgets the attempts: the faults come back
    with pytest.raises(openai.InternalServerError):
        chat(oai, "row 1 [[500x3]]")


def test_fail_first_is_exact_per_distinct_request(api, oai):
    api.configure(fail_first=2, retry_after=0)
    attempts = {}
    for row, color in (("row a", (1, 0, 0)), ("row b", (0, 9, 9))):
        for attempt in range(1, 10):
            try:
                chat(oai, "same caption prompt", data_url(image_bytes(color=color)))
            except openai.RateLimitError as err:
                assert err.response.headers["retry-after"] == "0"
                continue
            attempts[row] = attempt
            break
    assert attempts == {"row a": 3, "row b": 3}  # same text, different images: distinct requests
    assert api.stats()["by_status"] == {"429": 4, "200": 2} and api.stats()["faults"] == {"fail_first": 4}
    # The SDK's own retries honour Retry-After and get through on the third try.
    retrying = openai.OpenAI(base_url=api.url + "/v1", api_key="t", max_retries=2)
    assert retrying.images.generate(model="gpt-image-1", prompt="fresh").data
    assert api.stats()["by_endpoint"]["images.generations"] == 3


def test_seed_replays_the_same_faults(api, oai):
    def statuses():
        api.reset()
        out = []
        for i in range(20):
            try:
                chat(oai, f"r{i}")
                out.append(200)
            except openai.RateLimitError:
                out.append(429)
        return out
    api.configure(rate_429=0.5, retry_after=0, seed=11)
    first = statuses()
    assert first == statuses() and 0 < first.count(429) < 20


def test_hang_times_out_client_and_frees_the_slot(api, oai):
    with pytest.raises(openai.APITimeoutError):
        chat(oai, "[[hang]]", timeout=0.3)
    deadline = time.monotonic() + 3
    while api.stats()["inflight"] and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = api.stats()
    assert stats["inflight"] == 0
    assert stats["by_status"] == {"cancelled": 1} and stats["faults"] == {"hang": 1}


def test_stop_ends_hanging_requests_quickly():
    api = FakeAPI(FakeConfig(rate_hang=1.0))
    client = openai.OpenAI(base_url=api.start() + "/v1", api_key="t", max_retries=0, timeout=30)
    outcome = []
    worker = threading.Thread(
        target=lambda: outcome.append(pytest.raises(openai.APIError, chat, client, "x")))
    worker.start()
    while not api.stats()["inflight"]:
        time.sleep(0.01)
    started = time.monotonic()
    api.stop()
    worker.join(5)
    assert time.monotonic() - started < 3 and outcome  # the client got an answer (504), not a 30 s wait


def test_latency_and_max_inflight_under_concurrency(api):
    api.configure(latency=0.2)

    async def burst():
        client = openai.AsyncOpenAI(base_url=api.url + "/v1", api_key="t", max_retries=0)
        started = time.monotonic()
        results = await asyncio.gather(*(client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": f"row {i}"}]) for i in range(50)))
        await client.close()
        return results, time.monotonic() - started

    results, wall = asyncio.run(burst())
    assert len(results) == 50 and all(r.choices[0].message.content for r in results)
    assert 0.2 <= wall < 2.0  # 50 x 0.2 s would be 10 s if requests were served one at a time
    assert api.stats()["max_inflight"] == 50 and api.stats()["inflight"] == 0


def test_latency_counts_from_the_requests_arrival_so_a_slow_body_is_not_added_to_it(api):
    # A benchmark's limit is in-flight / latency: the fake's own reading and parsing must not lengthen it.
    api.configure(latency=0.3)
    host, port = api.url.removeprefix("http://").split(":")
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "slow body"}]}).encode()
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: fake\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        started = time.monotonic()
        time.sleep(0.2)  # the body arrives 0.2 s after the headers
        conn.sendall(body)
        answer = conn.makefile("rb").readline()
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 200")
    assert 0.3 <= waited < 0.45  # 0.3 s from arrival, not 0.2 + 0.3
    stats = api.stats()
    assert 0.3 <= stats["answer_seconds_total"] / stats["requests_total"] < 0.45


def test_sustains_256_concurrent_slow_requests(api):
    api.configure(latency=0.5)

    async def burst():
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            async def one(i):
                body = {"model": "m", "messages": [{"role": "user", "content": f"{i}"}]}
                async with session.post(api.url + "/v1/chat/completions", json=body) as r:
                    return r.status
            started = time.monotonic()
            statuses = await asyncio.gather(*(one(i) for i in range(256)))
            return statuses, time.monotonic() - started

    statuses, wall = asyncio.run(burst())
    assert statuses == [200] * 256 and wall < 4.0
    assert api.stats()["max_inflight"] == 256


# ----- control endpoints and CLI -------------------------------------------------------------------------


def test_control_endpoints(api, oai):
    assert http_json(api.url + "/_config", {"latency": 0.01, "fail_first": "1"})["fail_first"] == 1
    assert api.config.latency == 0.01
    with pytest.raises(urllib.error.HTTPError) as err:
        http_json(api.url + "/_config", {"no_such_knob": 1})
    assert err.value.code == 400
    with pytest.raises(openai.RateLimitError):
        chat(oai, "x")
    assert http_json(api.url + "/_stats")["by_status"] == {"429": 1}
    assert http_json(api.url + "/_requests")[0]["fault"] == "fail_first"
    http_json(api.url + "/_reset", {})
    assert http_json(api.url + "/_stats")["requests_total"] == 0 and http_json(api.url + "/_requests") == []
    with pytest.raises(openai.RateLimitError):  # reset forgot the earlier attempt: the first try fails again
        chat(oai, "x")
    assert chat(oai, "x").choices


def test_cli_serves_and_stops_on_sigterm(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "dfk8s.testing.fake_api", "--port", "0",
                             "--fail-first", "1", "--retry-after", "0"],
                            stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:")
        url = line.removeprefix("listening on ")
        client = openai.OpenAI(base_url=url + "/v1", api_key="t", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            chat(client, "cli")
        assert chat(client, "cli").choices
        assert http_json(url + "/_stats")["by_status"] == {"429": 1, "200": 1}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
