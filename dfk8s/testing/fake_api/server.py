"""A fake OpenAI / Gemini API server that speaks the real wire formats and injects faults on demand.

Tests and benchmarks point the real `openai` and `google-genai` SDKs at it; a Kubernetes test runs it
in the cluster with `python -m dfk8s.testing.fake_api --host 0.0.0.0 --port 8000`. Gemini's request
and reply shapes live in `gemini.py`; everything else (faults, counters, OpenAI) is here.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import functools
import hashlib
import json
import logging
import random
import re
import signal
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from dfk8s.testing.fake_api import batch, gemini
from dfk8s.testing.fake_api._wire import (
    COUNTED_TRIGGER,
    KNOB_TYPES,
    MALFORMED_BODY,
    OPENAI_EDIT_MIMES,
    ApiError,
    Call,
    FakeConfig,
    InImage,
    b64decode,
    fetch_loopback_image,
    inspect_image,
    make_png,
    scaled,
    size_from,
    truncate,
    words,
)

log = logging.getLogger(__name__)
_DATA_URL = re.compile(r"^data:([^;,]*)((?:;[^;,]*)*),(.*)$", re.S)
_FILE_STORE_SIZE = 4096
_REQUEST_LOG_SIZE = 200


class FakeAPI:
    """The fake server: runs in a background thread with its own event loop.

    Args:
        config: The knobs; the same object stays live, so changing it changes the server.
        host: Address to bind.
        port: Port to bind; 0 picks a free one (read it from `port` or the URL after `start()`).

    Example:
        with FakeAPI(FakeConfig(latency=0.1)) as api:
            client = openai.OpenAI(base_url=api.url + "/v1", api_key="test", max_retries=0)
    """

    def __init__(self, config: FakeConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config or FakeConfig()
        self.host, self.port = host, port
        self._lock = threading.Lock()  # counters are read from the caller's thread
        self._files: OrderedDict[str, bytes] = OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._closing: asyncio.Event | None = None
        self._start_error: BaseException | None = None
        self._model_errors: dict[str, tuple[int, Any]] = {}
        self.reset()

    # ----- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL to give clients (a wildcard bind address is reached through loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://{host}:{self.port}"

    def start(self) -> str:
        """Starts serving in a background thread; returns the base URL, e.g. `http://127.0.0.1:PORT`."""
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="fake-api", daemon=True)
        self._thread.start()
        ready.wait(30)
        if self._start_error is not None:
            raise RuntimeError(f"fake API could not start: {self._start_error}") from self._start_error
        log.info("fake API listening on %s:%s", self.host, self.port)
        return self.url

    def stop(self) -> None:
        """Stops serving; requests still hanging are answered 504 and connections closed."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._astop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        self._loop = self._thread = None

    def __enter__(self) -> FakeAPI:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self, ready: threading.Event) -> None:
        loop = _new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._astart())
        except BaseException as exc:  # reported to start()'s caller, who is waiting on `ready`
            self._start_error = exc
            ready.set()
            loop.close()
            return
        self._loop = loop
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _astart(self) -> None:
        self._closing = asyncio.Event()
        # Big bodies: base64 images in chat and multipart edits exceed aiohttp's 1 MiB default.
        app = web.Application(client_max_size=256 * 1024 * 1024)
        self._routes(app)
        # handler_cancellation: a client that times out and hangs up ends its handler, so the
        # in-flight counter stays true; a short shutdown_timeout keeps stop() quick.
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                     handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=2048, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _astop(self) -> None:
        if self._closing is not None:
            self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def _routes(self, app: web.Application) -> None:
        self.batches, self.gemini_batches = batch.OpenAIBatches(self), batch.GeminiBatches(self)
        self.batches.routes(app)
        self.gemini_batches.routes(app)  # before models/{target}: batchGenerateContent is matched first

        openai_routes = {"/chat/completions": ("chat.completions", self._parse_chat, self._reply_chat),
                         "/images/generations": ("images.generations", self._parse_generate,
                                                 self._reply_images),
                         "/images/edits": ("images.edits", self._parse_edit, self._reply_images)}
        for prefix in ("", "/v1"):
            for path, (endpoint, parse, reply) in openai_routes.items():
                app.router.add_post(prefix + path, self._endpoint(endpoint, "openai", parse, reply))
        gemini_endpoint = self._endpoint("gemini.generateContent", "gemini",
                                functools.partial(gemini.parse, self),
                                functools.partial(gemini.reply, self))
        for prefix in ("", "/v1", "/v1beta", "/v1alpha"):
            app.router.add_post(prefix + "/models/{target}", gemini_endpoint)
        app.router.add_get("/files/{name}", self._h_file)
        app.router.add_get("/_stats", self._h_stats)
        app.router.add_get("/_requests", self._h_requests)
        app.router.add_get("/_config", self._h_config)
        app.router.add_post("/_config", self._h_config)
        app.router.add_post("/_reset", self._h_reset)
        app.router.add_post("/_fail_model", self._h_fail_model)
        app.router.add_get("/healthz", self._h_health)

    # ----- counters --------------------------------------------------------------------------------

    def reset(self) -> None:
        """Zeroes counters, forgets logged requests and `fail_first` attempts, reseeds the generator."""
        with self._lock:
            self._rng = random.Random(self.config.seed)
            self._attempts: dict[str, int] = {}
            self._log: deque[dict[str, Any]] = deque(maxlen=_REQUEST_LOG_SIZE)
            self._bodies: deque[dict[str, Any]] = deque(maxlen=max(1, self.config.keep_bodies))
            self._seq = 0
            self._stats: dict[str, Any] = {
                "requests_total": 0, "by_endpoint": {}, "by_status": {}, "faults": {},
                "inflight": 0, "max_inflight": 0, "retry_after_sent": [],
                "auth": {"present": 0, "missing": 0}, "files_served": 0,
                "answer_seconds_total": 0.0}

    def configure(self, **changes: Any) -> FakeConfig:
        """Changes knobs at runtime (`seed` also reseeds the generator); returns the config."""
        self.config.update(**changes)
        if "keep_bodies" in changes:
            with self._lock:
                self._bodies = deque(self._bodies, maxlen=max(1, self.config.keep_bodies))
        if "seed" in changes:
            with self._lock:
                self._rng = random.Random(self.config.seed)
        return self.config

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters (the JSON of `GET /_stats`)."""
        with self._lock:
            return json.loads(json.dumps(self._stats))

    def requests(self) -> list[dict[str, Any]]:
        """The last 200 API requests, oldest first, image data shortened (`GET /_requests`)."""
        with self._lock:
            return json.loads(json.dumps(list(self._log)))

    def bodies(self) -> list[dict[str, Any]]:
        """The raw requests kept under `keep_bodies`, oldest first: seq, method, path, headers, body."""
        with self._lock:
            return list(self._bodies)

    def fail_model(self, model: str, status: int, body: Any) -> None:
        """Answer every request for `model` with `status` and `body` (a JSON value, or text), verbatim.

        For the answers proxies give: LiteLLM's `400 no_db_connection` for a key it cannot check, say.
        """
        with self._lock:
            self._model_errors[model] = (int(status), body)

    def _bump(self, group: str, name: str) -> None:
        counts = self._stats[group]
        counts[name] = counts.get(name, 0) + 1

    async def _h_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _h_requests(self, request: web.Request) -> web.Response:
        return web.json_response(self.requests())

    async def _h_health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _h_config(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                self.configure(**(await request.json()))
            except (ValueError, TypeError) as exc:
                return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(dataclasses.asdict(self.config))

    async def _h_fail_model(self, request: web.Request) -> web.Response:
        spec = await request.json()
        self.fail_model(spec["model"], spec["status"], spec.get("body"))
        return web.json_response({"ok": True})

    async def _h_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    async def _h_file(self, request: web.Request) -> web.Response:
        data = self._files.get(request.match_info["name"].removesuffix(".png"))
        if data is None:
            raise web.HTTPNotFound(text="no such file")
        with self._lock:
            self._stats["files_served"] += 1
        return web.Response(body=data, content_type="image/png")

    # ----- the request pipeline ----------------------------------------------------------------------

    def _endpoint(self, endpoint: str, dialect: str, parse: Callable[..., Awaitable[Call]],
                  reply: Callable[..., dict[str, Any]]) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            arrived = time.monotonic()
            auth = next((h for h in ("Authorization", "x-goog-api-key") if h in request.headers), None)
            if auth is None and "key" in request.query:
                auth = "key query parameter"
            with self._lock:  # counters first, so in-flight counts include requests still parsing
                self._seq += 1
                entry = {"seq": self._seq, "endpoint": endpoint, "path": request.path, "auth": auth}
                self._log.append(entry)
                s = self._stats
                s["requests_total"] += 1
                self._bump("by_endpoint", endpoint)
                self._bump("auth", "present" if auth else "missing")
                s["inflight"] += 1
                s["max_inflight"] = max(s["max_inflight"], s["inflight"])
            if self.config.keep_bodies > 0:
                raw = await request.read()  # cached: the parsers read the same bytes
                with self._lock:
                    self._bodies.append({"seq": entry["seq"], "method": request.method, "path": request.path,
                                         "query": dict(request.query), "headers": dict(request.headers),
                                         "body": raw})
            status: int | str = "cancelled"  # what a client hang-up leaves
            try:
                response = await self._process(request, entry, dialect, parse, reply, arrived)
                if dialect == "openai":  # the SDK exposes it as `_request_id`; servings may log it
                    response.headers["x-request-id"] = f"req_fake{entry['seq']}"
                status = response.status
                return response
            finally:
                with self._lock:
                    self._stats["inflight"] -= 1
                    self._stats["answer_seconds_total"] += time.monotonic() - arrived
                    self._bump("by_status", str(status))
                    entry["status"] = status
                log.debug("%s %s -> %s", request.method, request.path, status)
        return handler

    async def _process(self, request: web.Request, entry: dict[str, Any], dialect: str,
                       parse: Callable[..., Awaitable[Call]],
                       reply: Callable[..., dict[str, Any]], arrived: float) -> web.Response:
        try:
            call = await parse(request, entry)
        except ApiError as exc:
            return self._error(dialect, exc)
        except (AttributeError, TypeError, KeyError) as exc:  # a JSON shape the parsers did not expect
            return self._error(dialect,
                               ApiError(400, f"Malformed request body ({type(exc).__name__}: {exc})."))
        entry.update(model=call.model, system=call.system, prompt=call.prompt, n_images=len(call.images),
                     image_mimes=[i.mime for i in call.images], has_mask=call.mask is not None)
        refused = self._refuse(request, dialect, call)
        if refused is not None:
            return refused
        if self.config.latency > 0:  # counted from the request's arrival: reading and parsing included
            await asyncio.sleep(max(0.0, arrived + self.config.latency - time.monotonic()))
        mode = self._decide(call)
        entry["fault"] = mode
        if mode == "hang":
            try:  # a stopping server ends hangs early rather than holding shutdown
                await asyncio.wait_for(self._closing.wait(), self.config.hang_seconds)  # type: ignore[union-attr]
            except TimeoutError:
                pass
            return self._error(dialect, ApiError(504, "Deadline exceeded (fake hang).", type_="timeout"))
        if mode in ("429", "fail_first"):
            return self._rate_limited(dialect)
        if mode in ("500", "503"):
            text = ("The server had an error while processing your request." if mode == "500"
                    else "Overloaded.")
            return self._error(dialect, ApiError(int(mode), text, type_="server_error"))
        try:
            if call.images or call.mask:  # Pillow releases the GIL: decoding off the loop stalls no one
                await asyncio.to_thread(self._inspect, call)
            if mode == "malformed":
                return web.Response(status=200, text=MALFORMED_BODY, content_type="application/json")
            return web.json_response(reply(request, call, mode))
        except ApiError as exc:
            return self._error(dialect, exc)

    def _refuse(self, request: web.Request, dialect: str, call: Call) -> web.Response | None:
        """The answer to a wrong key, an unknown model or a model told to fail; None to go on."""
        cfg = self.config
        if cfg.api_key:
            given = (request.headers.get("Authorization", "").removeprefix("Bearer ")
                     or request.headers.get("x-goog-api-key") or request.query.get("key", ""))
            if given != cfg.api_key:
                if dialect == "gemini":
                    body = gemini.error_body(400, "API key not valid. Please pass a valid API key.")
                    body["error"]["details"] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                                 "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]
                    return web.json_response(body, status=400)
                shown = (given[:3] + "*" * 10 + given[-4:]) if len(given) > 8 else "****"
                return self._error(dialect, ApiError(
                    401, f"Incorrect API key provided: {shown}. You can find your API key at "
                         "https://platform.openai.com/account/api-keys.", code="invalid_api_key"))
        with self._lock:
            failing = self._model_errors.get(call.model.removeprefix("models/"))
        if failing is not None:
            status, body = failing
            if isinstance(body, str):
                return web.Response(status=status, text=body)
            return web.json_response(body, status=status)
        known = [m.strip() for m in cfg.models.split(",") if m.strip()]
        if known and call.model.removeprefix("models/") not in known:
            if dialect == "gemini":
                return self._error(dialect, ApiError(
                    404, f"models/{call.model.removeprefix('models/')} is not found for API version v1beta, "
                         "or is not supported for generateContent. Call ListModels to see the list of "
                         "available models and their supported methods."))
            return self._error(dialect, ApiError(
                404, f"The model `{call.model}` does not exist or you do not have access to it.",
                code="model_not_found"))
        return None

    def _decide(self, call: Call) -> str | None:
        """The fault for this request: a content trigger (plain or counted), `fail_first`, a random knob."""
        mode = call.trigger()
        cfg = self.config
        counted = COUNTED_TRIGGER.search("\n".join(call.texts)) if mode is None else None
        with self._lock:
            if counted is not None:
                key = "counted:" + call.endpoint + call.key()
                self._attempts[key] = self._attempts.get(key, 0) + 1
                if self._attempts[key] <= int(counted.group(2)):
                    mode = counted.group(1)
            if mode is None and cfg.fail_first > 0:
                key = call.endpoint + call.key()
                self._attempts[key] = self._attempts.get(key, 0) + 1
                if self._attempts[key] <= cfg.fail_first:
                    mode = "fail_first"
            knobs = (("429", cfg.rate_429), ("5xx", cfg.rate_5xx), ("hang", cfg.rate_hang),
                     ("malformed", cfg.rate_malformed), ("empty", cfg.rate_empty),
                     ("refusal", cfg.rate_refusal), ("text_only", cfg.text_only))
            for name, rate in knobs if mode is None else ():
                # Draw only for knobs that are on, so a seed replays the same faults.
                if rate > 0 and self._rng.random() < rate:
                    mode = self._rng.choice(("500", "503")) if name == "5xx" else name
                    break
            if mode is not None:
                self._bump("faults", mode)
        return mode

    def _rate_limited(self, dialect: str) -> web.Response:
        seconds = self.config.retry_after
        value = str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"
        with self._lock:
            sent = self._stats["retry_after_sent"]
            sent.append(float(seconds))
            del sent[:-10000]  # bounded for long benchmarks
        if dialect == "gemini":
            exc = ApiError(429, "Resource has been exhausted (e.g. check quota).", code=f"{seconds:g}s")
        else:
            exc = ApiError(429, f"Rate limit reached (fake). Please try again in {value}s.",
                           code="rate_limit_exceeded", type_="requests")
        return self._error(dialect, exc, headers={"Retry-After": value})

    def _error(self, dialect: str, exc: ApiError, headers: dict[str, str] | None = None) -> web.Response:
        if dialect == "gemini":
            body = gemini.error_body(exc.status, exc.message,
                                          retry_delay=exc.code if exc.status == 429 else None)
        else:
            body = {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}
        return web.json_response(body, status=exc.status, headers=headers)

    def _inspect(self, call: Call) -> None:
        # Multipart parts declare a Content-Type the real API checks; data URLs and Gemini blobs too.
        for img in call.images:
            inspect_image(img, decode=bool(self.config.decode_images))
        if call.mask is not None:
            inspect_image(call.mask, decode=bool(self.config.decode_images))
            if call.images and call.mask.size != call.images[0].size:
                raise ApiError(400, "Invalid mask: the mask and the image must have the same dimensions.",
                               code="invalid_value", param="mask")

    def store_file(self, request: web.Request, data: bytes) -> str:
        """Keeps `data` for `GET /files/<id>.png` and returns its URL as this client reaches the server."""
        file_id = hashlib.sha256(data).hexdigest()[:32]
        with self._lock:
            self._files[file_id] = data
            self._files.move_to_end(file_id)
            while len(self._files) > _FILE_STORE_SIZE:
                self._files.popitem(last=False)
        return f"{request.scheme}://{request.host}/files/{file_id}.png"

    # ----- OpenAI ------------------------------------------------------------------------------------

    @staticmethod
    async def _json(request: web.Request, entry: dict[str, Any]) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "We could not parse the JSON body of your request.") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        entry["body"] = truncate(body)
        return body

    async def _parse_chat(self, request: web.Request, entry: dict[str, Any]) -> Call:
        body = await self._json(request, entry)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty array.", param="messages",
                           code="invalid_value")
        if body.get("stream"):
            raise ApiError(400, "The fake server does not stream.", param="stream", code="unsupported_value")
        texts: list[str] = []
        images: list[InImage] = []
        system, last_user = None, ""
        for i, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
            mine = []
            for j, part in enumerate(parts):
                where = f"messages[{i}].content[{j}]"
                if part.get("type") == "text":
                    mine.append(str(part.get("text") or ""))
                elif part.get("type") == "image_url":
                    url = part.get("image_url")
                    url = url.get("url", "") if isinstance(url, dict) else str(url or "")
                    if url.startswith(("http://", "https://")):  # the provider fetches it, as OpenAI does
                        images.append(await fetch_loopback_image(url, where))
                        entry.setdefault("image_urls", []).append(url)
                        continue
                    match = _DATA_URL.match(url)
                    if not match or "base64" not in match.group(2):
                        raise ApiError(400, f"Invalid image at {where}: the fake server accepts only base64 "
                                            "data URLs.", code="invalid_image_url", param=where)
                    images.append(InImage(where, match.group(1), b64decode(match.group(3), where)))
                else:
                    raise ApiError(400, f"Invalid content part type {part.get('type')!r}.", param=where,
                                   code="invalid_value")
            texts += mine
            role = message.get("role")
            if role in ("system", "developer"):
                system = "\n".join(([system] if system else []) + mine)
            elif role == "user":
                last_user = "\n".join(mine)
        params = {k: body[k] for k in ("temperature", "max_tokens", "max_completion_tokens", "n", "seed")
                  if k in body}
        return Call("chat.completions", str(body.get("model") or ""), texts, last_user, system, images,
                    params=params, turns=len(messages))

    def _reply_chat(self, request: web.Request, call: Call, mode: str | None) -> dict[str, Any]:
        described = "".join(f", {img.describe()}" for img in call.images)
        text = (f"fake caption: {call.prompt[:60]} (images: {len(call.images)}{described}; "
                f"system: {'yes' if call.system else 'no'})")
        limit = call.params.get("max_completion_tokens") or call.params.get("max_tokens")
        finish = "stop"
        if limit and words(text) > int(limit):  # a word stands for a token, enough to test "length"
            text, finish = " ".join(text.split()[: int(limit)]), "length"
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
        if mode in ("refusal", "block"):
            message.update(content=None, refusal="I'm sorry, but I can't help with that request.")
        n = 0 if mode == "empty" else int(call.params.get("n") or 1)
        prompt_tokens = sum(words(t) for t in call.texts) + 85 * len(call.images)
        completion_tokens = words(text) * n
        return {"id": f"chatcmpl-fake{uuid.uuid4().hex[:24]}", "object": "chat.completion",
                "created": int(time.time()), "model": call.model, "system_fingerprint": "fp_fake",
                "service_tier": "default",
                "choices": [{"index": k, "message": message, "logprobs": None, "finish_reason": finish}
                            for k in range(n)],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    async def _parse_generate(self, request: web.Request, entry: dict[str, Any]) -> Call:
        body = await self._json(request, entry)
        return self._images_call("images.generations", body, [], None)

    async def _parse_edit(self, request: web.Request, entry: dict[str, Any]) -> Call:
        if not request.content_type.startswith("multipart/form-data"):
            raise ApiError(400, "images/edits takes multipart/form-data.", code="invalid_value")
        form = await request.post()
        fields: dict[str, Any] = {}
        images: list[InImage] = []
        mask = None
        files = []
        for name, value in form.items():
            if not isinstance(value, web.FileField):
                fields[name] = value
                continue
            img = InImage(name, value.content_type or "", value.file.read())
            files.append({"field": name, "filename": value.filename, "content_type": img.mime,
                          "bytes": len(img.data)})
            if name == "mask":
                mask = img
            elif name == "image" or name.startswith("image["):
                images.append(img)
            else:
                raise ApiError(400, f"Unexpected file field {name!r}.", param=name, code="invalid_value")
        entry["body"] = {**fields, "files": files}
        if not images:
            raise ApiError(400, "Missing required parameter: 'image'.", param="image",
                           code="missing_required_parameter")
        for img in images + ([mask] if mask else []):
            if img.mime not in OPENAI_EDIT_MIMES:  # what the real API answers to application/octet-stream
                raise ApiError(400, f"Invalid file '{img.where}': unsupported mimetype ('{img.mime}'). "
                                    "Supported file formats are 'image/jpeg', 'image/png', "
                                    "and 'image/webp'.",
                               param=img.where, code="invalid_value")
        return self._images_call("images.edits", fields, images, mask)

    @staticmethod
    def _images_call(endpoint: str, body: dict[str, Any], images: list[InImage],
                     mask: InImage | None) -> Call:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "Missing required parameter: 'prompt'.", param="prompt",
                           code="missing_required_parameter")
        model = str(body.get("model") or "dall-e-2")
        try:
            n = int(body.get("n") or 1)
        except ValueError:
            n = 0
        if not 1 <= n <= 10 or (model == "dall-e-3" and n != 1):
            raise ApiError(400, f"Invalid 'n': {body.get('n')!r}.", param="n", code="invalid_value")
        if model == "dall-e-2" and len(images) > 1:
            raise ApiError(400, "dall-e-2 edits take one image.", param="image", code="invalid_value")
        params = {k: body[k] for k in ("size", "quality", "response_format", "output_format", "background")
                  if body.get(k) is not None}
        return Call(endpoint, model, [prompt], prompt, None, images, mask, {**params, "n": n})

    def _reply_images(self, request: web.Request, call: Call, mode: str | None) -> dict[str, Any]:
        if mode in ("refusal", "block"):
            raise ApiError(400, "Your request was rejected as a result of our safety system.",
                           code="content_policy_violation", type_="image_generation_user_error")
        gpt = call.model.startswith("gpt-image")
        # dall-e answers with URLs unless asked otherwise; GPT image models only ever send base64.
        fmt = "b64_json" if gpt else call.params.get("response_format", "url")
        limit = self.config.image_size
        size = size_from(call.params.get("size"), limit) or (
            scaled(*call.images[0].size, limit) if call.images else (limit, limit))
        data = []
        for k in range(0 if mode == "empty" else call.params["n"]):
            png = make_png(f"{call.key()}|{k}", *size)
            item = {"b64_json": base64.b64encode(png).decode()} if fmt == "b64_json" else {
                "url": self.store_file(request, png)}
            if call.model == "dall-e-3":
                item["revised_prompt"] = f"fake revised prompt: {call.prompt}"
            data.append(item)
        out: dict[str, Any] = {"created": int(time.time()), "data": data}
        if gpt:
            text_tokens = words(call.prompt)
            out.update(output_format="png", usage={
                "input_tokens": text_tokens + 65 * len(call.images), "output_tokens": 272 * len(data),
                "total_tokens": text_tokens + 65 * len(call.images) + 272 * len(data),
                "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": 65 * len(call.images)}})
        return out


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """The fake's event loop: uvloop's where it is installed.

    At a thousand requests a second it then adds less of its own time to ``latency`` (the benchmarks
    report the fake's real time per answer).
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main(argv: list[str] | None = None) -> int:
    """The CLI: `python -m dfk8s.testing.fake_api --port 0 [--host 0.0.0.0] [--latency 0.1 ...]`."""
    parser = argparse.ArgumentParser(prog="python -m dfk8s.testing.fake_api",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log-level", default="WARNING")
    for f in dataclasses.fields(FakeConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), type=KNOB_TYPES[f.type],
                            default=f.default, help=f"default {f.default}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = FakeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FakeConfig)})
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    api = FakeAPI(config, args.host, args.port)
    api.start()
    print(f"listening on http://{args.host}:{api.port}", flush=True)
    while not stopping.wait(1.0):
        pass
    api.stop()
    return 0


