"""text2image and imageedit through Gemini's image models (``generateContent`` via ``google-genai``).

The row's conversation becomes a multi-turn request (system turn -> ``system_instruction``, assistant
turns -> role ``model``), input images ride as inline parts on the turn that carries them, and the
answer's ``inline_data`` parts are the output images. An answer without an image (text only, or blocked
for safety) fails the row with the model's text and finish reason kept in the error record.
Per-model rules live in :mod:`dfk8s.servings.image_models`; retries and limits come from
:class:`ApiServing` (the SDK's own retries are switched off).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import os
import re
from contextlib import contextmanager
from urllib.parse import urlsplit

from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from dfk8s.cost.usage import usage_from_gemini
from dfk8s.errors import SpecError, retry_after_seconds
from dfk8s.servings import GEMINI_KEY_ENV, SERVINGS, api_key_from_env
from dfk8s.servings.api import ApiOptions, ApiServing, PerLoop, RetryableError, RowFailure
from dfk8s.servings.base import Message, Request, Response
from dfk8s.servings.http_errors import error_object, status_error, transport_error
from dfk8s.servings.image_models import GeminiImageParams, as_png, check_gemini, returned_image
from dfk8s.servings.lean_http import LeanClient, client_choice, dumps_with_images

log = logging.getLogger(__name__)

DEFAULT_MODEL = SERVINGS["gemini-images"].defaults["model"]
#: Input image types Gemini takes inline; anything else is sent as PNG.
INLINE_MIMES = ("image/png", "image/jpeg", "image/webp", "image/heic", "image/heif")
#: Finish and block reasons that mean "refused", as opposed to "answered without an image".
REFUSAL_REASONS = frozenset({"SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "RECITATION",
                             "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION",
                             "MODEL_ARMOR", "JAILBREAK"})
_VERSION = re.compile(r"^v\d+(?:(?:alpha|beta)\d*)?$")
_ENDPOINT = re.compile(r"/models/[^/]+:[A-Za-z]+$")


def split_base_url(url: str | None) -> tuple[str | None, str | None]:
    """Turn what users paste into the SDK's ``(base_url, api_version)``, never doubling the version.

    ``http://host`` -> (``http://host``, None: the SDK's default version); ``http://host/v1beta/`` ->
    (``http://host``, ``v1beta``); a full ``.../v1beta/models/m:generateContent`` URL is cut back the same
    way; any other path is kept as the base.
    """
    if not url:
        return None, None
    url = _ENDPOINT.sub("", url.rstrip("/")).rstrip("/")
    head, _, last = url.rpartition("/")
    if _VERSION.match(last) and urlsplit(url).path.strip("/"):
        return head, last
    return url, None


def _retry_after(exc: genai_errors.APIError) -> float | None:
    """Seconds to wait from a 429: the Retry-After header, else the body's google.rpc.RetryInfo."""
    headers = getattr(exc.response, "headers", None)
    seconds = retry_after_seconds(headers.get("retry-after")) if headers is not None else None
    if seconds is not None:
        return seconds
    details = exc.details.get("error", {}).get("details") if isinstance(exc.details, dict) else None
    for item in details or []:
        delay = item.get("retryDelay") if isinstance(item, dict) else None
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                return float(delay[:-1])
            except ValueError:
                return None
    return None


def _transport_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(timeout, connection) exception types of whichever HTTP stack the SDK uses."""
    timeouts: list[type[BaseException]] = [TimeoutError, asyncio.TimeoutError]
    connection: list[type[BaseException]] = [ConnectionError]
    try:
        import aiohttp

        connection.append(aiohttp.ClientError)
    except ImportError:
        pass
    for name in ("httpx", "httpx2"):
        try:
            mod = __import__(name)
        except ImportError:
            continue
        timeouts.append(mod.TimeoutException)
        connection.append(mod.TransportError)
    return tuple(timeouts), tuple(connection)


_TIMEOUTS, _CONNECTION_ERRORS = _transport_errors()


def _api_error(code: int, body, retry_after: float | None, path: str | None = None) -> Exception:
    """A Gemini error answer as a retry decision (shared by the SDK and the lean path).

    ``path``: the API path asked (its version named in a 405's message).
    """
    if code == 400 and "API_KEY_INVALID" in json.dumps(body, default=str):
        message, _ = error_object(body)
        return RowFailure("AuthenticationError", f"HTTP 400: {message}",
                          {"status": 400, "code": "API_KEY_INVALID"}, systematic=True)
    if code == 405:
        version = (path or "/v1/").strip("/").split("/")[0] or "v1"
        return RowFailure("NotFound", f"HTTP 405 Method Not Allowed on /{version}/models/...: this server "
                          "does not serve Gemini's API there; gateways (LiteLLM) serve it at /v1beta: pass "
                          "--api-url with /v1beta at its end", {"status": 405}, systematic=True)
    return status_error(code, body, retry_after)


@contextmanager
def gemini_errors(model: str, host: str | None = None, path: str | None = None):
    """Translate google-genai's exceptions as the lean path does (:mod:`dfk8s.servings.http_errors`).

    429/5xx/timeouts/garbage retry; a bad key (401/403, 400 API_KEY_INVALID), an unknown model or path
    (404) and an unresolvable host are systematic (the breaker trips); other 4xx fail the row.
    """
    try:
        yield
    except genai_errors.APIError as exc:
        body = exc.details if isinstance(exc.details, dict) and exc.details else (exc.message or exc.status)
        raise _api_error(exc.code or 0, body, _retry_after(exc), path) from None
    except (genai_errors.UnknownApiResponseError, json.JSONDecodeError) as exc:
        raise RetryableError("MalformedResponse", f"unparseable response: {type(exc).__name__}") from None
    except (*_TIMEOUTS, *_CONNECTION_ERRORS) as exc:
        raise transport_error(exc, host) from None


def turns(request: Request) -> tuple[list[tuple[str, list]], str | None]:
    """The request as Gemini turns, and the system instruction (None without one).

    Each turn is ``(role, parts)``, a part a ``str`` or an :class:`ImageInput`; both request paths build
    their bodies from this.
    """
    messages = list(request.messages)
    if request.images and not any(m.images for m in messages):
        # Images not attached to any turn go on the last user turn.
        last = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
        if last is None:
            messages.append(Message("user", "", tuple(request.images)))
        else:
            m = messages[last]
            messages[last] = Message(m.role, m.text, tuple(request.images))
    system = "\n\n".join(m.text for m in messages if m.role == "system" and m.text) or None
    out = []
    for m in messages:
        if m.role == "system":
            continue
        parts = [m.text] if m.text else []
        parts += [img if img.mime in INLINE_MIMES else as_png(img) for img in m.images]
        if parts:
            out.append(("model" if m.role == "assistant" else "user", parts))
    return out, system


def build_contents(request: Request) -> tuple[list[types.Content], str | None]:
    """Return the request's turns as Gemini contents, and the system instruction (None without one)."""
    found, system = turns(request)
    def part(p):
        if isinstance(p, str):
            return types.Part.from_text(text=p)
        return types.Part.from_bytes(data=p.data, mime_type=p.mime)

    contents = [types.Content(role=role, parts=[part(p) for p in parts]) for role, parts in found]
    return contents, system


class _View:
    """A JSON object read with the SDK's attribute names (``inline_data`` finds ``inlineData``)."""

    __slots__ = ("_d",)

    def __init__(self, d: dict):
        self._d = d

    def __getattr__(self, name: str):
        head, *rest = name.split("_")
        value = self._d.get(head + "".join(w.title() for w in rest), self._d.get(name))
        if isinstance(value, dict):
            return _View(value)
        if isinstance(value, list):
            return [_View(v) if isinstance(v, dict) else v for v in value]
        return value


def _b64(text) -> bytes:
    """Inline data from JSON: base64 in either alphabet, padding optional (as the SDK's models take it)."""
    text = text if isinstance(text, str) else ""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sdk_api_version() -> str:
    """The API version google-genai uses when the URL names none (it reads GOOGLE_GENAI_API_VERSION)."""
    from google.genai import _api_client

    env = os.environ.get("GOOGLE_GENAI_API_VERSION")
    return "v1beta" if env == "beta" else (env or _api_client.GOOGLE_AI_API_DEFAULT_VERSION)


def _name(value) -> str | None:
    """Return an SDK enum (or a raw string from a newer API) as its plain name."""
    if value is None:
        return None
    return str(getattr(value, "value", value))


class GeminiImagesServing(ApiServing):
    """Gemini image models: one generateContent call per row, images out of inline_data."""

    name = "gemini-images"

    def __init__(self, options: ApiOptions, params: GeminiImageParams, *, temperature: float | None = None,
                 client: str = "fast"):
        super().__init__(options)
        self.params = params
        self.lean = client == "fast"
        base_url, api_version = split_base_url(options.api_url)
        self.host = urlsplit(base_url or "https://generativelanguage.googleapis.com").hostname
        key = api_key_from_env(GEMINI_KEY_ENV)
        # The lean path posts where the SDK would: base URL, API version (the SDK's default), model path.
        version = api_version or _sdk_api_version()
        model = params.model if "/" in params.model else f"models/{params.model}"
        self.lean_path = f"/{version}/{model}:generateContent"
        self.lean_clients = PerLoop(lambda: LeanClient(
            (base_url or "https://generativelanguage.googleapis.com").rstrip("/"),
            {"x-goog-api-key": key.strip(), "X-Server-Timeout": str(math.ceil(options.timeout))},
            options.timeout, options.max_concurrency * 2,
            errors=lambda code, body, retry_after: _api_error(code, body, retry_after, self.lean_path)))
        generation = {}
        if temperature is not None:
            generation["temperature"] = float(temperature)
        generation["responseModalities"] = ["TEXT", "IMAGE"]
        if params.aspect_ratio or params.image_size:
            generation["imageConfig"] = {k: v for k, v in (("aspectRatio", params.aspect_ratio),
                                                           ("imageSize", params.image_size)) if v}
        self.generation = generation
        http = types.HttpOptions(base_url=base_url, api_version=api_version,
                                 timeout=int(options.timeout * 1000),
                                 # attempts=1: no SDK retries, not even its hidden connection-error retry
                                 retry_options=types.HttpRetryOptions(attempts=1))
        self.client = genai.Client(api_key=api_key_from_env(GEMINI_KEY_ENV), vertexai=False,
                                   http_options=http)
        image_config = None
        if params.aspect_ratio or params.image_size:
            image_config = types.ImageConfig(aspect_ratio=params.aspect_ratio, image_size=params.image_size)
        self.config_args = {"response_modalities": ["TEXT", "IMAGE"], "image_config": image_config}
        if temperature is not None:
            self.config_args["temperature"] = float(temperature)

    @classmethod
    def from_spec(cls, spec) -> GeminiImagesServing:
        """Check the options against the model's rules (SpecError before any request) and build."""
        options = ApiOptions.from_spec(spec)
        if spec.pipeline not in ("text2image", "imageedit"):
            raise SpecError(f"gemini-images runs text2image and imageedit, not {spec.pipeline}")
        if spec.option("mask"):
            raise SpecError("gemini-images takes no mask; describe the area to edit in the prompt")
        params = check_gemini(options.model, aspect_ratio=spec.option("aspect_ratio"),
                              image_size=spec.option("image_size"), n=spec.option("images_per_prompt"))
        return cls(options, params, temperature=spec.option("temperature"), client=client_choice(spec))

    async def call(self, request: Request) -> Response:
        """Send one row's conversation; return its images or raise why there are none."""
        if not any(m.role == "user" and m.text.strip() for m in request.messages):
            raise RowFailure("BadInput", "the row has no prompt (no user turn with text)")
        if self.lean:
            return await self._call_lean(request)
        contents, system = build_contents(request)
        config = types.GenerateContentConfig(system_instruction=system, **self.config_args)
        with gemini_errors(self.params.model, self.host, self.lean_path):
            answer = await self.client.aio.models.generate_content(
                model=self.params.model, contents=contents, config=config)
        if not isinstance(answer, types.GenerateContentResponse):
            raise RetryableError("MalformedResponse", "the response is not a GenerateContentResponse")
        return self._response(answer, lambda data: data)

    def lean_body(self, request: Request, image=None) -> dict:
        """The generateContent body the SDK sends for this row, as plain JSON (keys in the SDK's order)."""
        image = image or (lambda data: base64.urlsafe_b64encode(data).decode())
        found, system = turns(request)
        body: dict = {"contents": [{"parts": [
            {"text": p} if isinstance(p, str) else {"inlineData": {"data": image(p.data),
                                                                   "mime_type": p.mime}}
            for p in parts], "role": role} for role, parts in found]}
        if system is not None:
            body["systemInstruction"] = {"parts": [{"text": system}], "role": "user"}
        body["generationConfig"] = self.generation
        return body

    async def _call_lean(self, request: Request) -> Response:
        # The SDK's own serializer is json.dumps with its defaults, URL-safe base64 for bytes.
        data = dumps_with_images(lambda slot: self.lean_body(request, slot),
                                 dumps=lambda o: json.dumps(o).encode(), encode=base64.urlsafe_b64encode)
        answer = await self.lean_clients.get().post(self.lean_path, data)
        if not isinstance(answer, dict):
            raise RetryableError("MalformedResponse", "the response is not a GenerateContentResponse")
        return self._response(_View(answer), _b64)

    def _response(self, answer, decode=lambda data: data) -> Response:
        """The row's result from a GenerateContentResponse (the SDK's model, or a :class:`_View` of JSON).

        Args:
            answer: The response.
            decode: Turns an inline part's ``data`` into bytes (default: as is; the SDK's model has
                decoded it already).
        """
        feedback = answer.prompt_feedback
        if feedback is not None and feedback.block_reason is not None:
            reason = _name(feedback.block_reason)
            why = f": {feedback.block_reason_message}" if feedback.block_reason_message else ""
            raise RowFailure("Refusal", f"the prompt was blocked ({reason}){why}",
                             {"text": None, "finish_reason": None, "block_reason": reason})
        if not answer.candidates:
            raise RetryableError("EmptyResponse", "the response has no candidates")
        candidate = answer.candidates[0]
        finish = _name(candidate.finish_reason)
        parts = (candidate.content.parts or []) if candidate.content is not None else []
        # Thought parts (Gemini 3 Pro Image's interim drafts and reasoning) are not the answer.
        final = [p for p in parts if not p.thought]
        text = "\n".join(p.text for p in final if p.text) or None
        blobs = [p.inline_data for p in final if p.inline_data is not None and p.inline_data.data]
        images = [returned_image(decode(b.data), f"candidates[0] image {k}") for k, b in enumerate(blobs)
                  if (b.mime_type or "image/").startswith("image/")]
        meta = {"finish_reason": finish}
        usage = usage_from_gemini(answer.usage_metadata, len(images))
        if usage is not None:
            meta["usage"] = usage.to_dict()
        if images:
            return Response(text=text, images=images, meta=meta)
        details = {"text": text, "finish_reason": finish}
        if "usage" in meta:
            details["usage"] = meta["usage"]  # an answer without an image is billed as well
        blocked = [_name(r.category) for r in candidate.safety_ratings or [] if r.blocked]
        if blocked:
            details["blocked_categories"] = blocked
        if finish in REFUSAL_REASONS or blocked:
            raise RowFailure("Refusal", f"the model refused (finish reason {finish})", details)
        said = f": {text[:200]!r}" if text else ""
        raise RowFailure("NoImage", f"the model answered without an image (finish reason {finish}){said}",
                         details)

    async def aclose(self) -> None:
        """Close the SDK client's and the lean path's sessions (inside the event loop that used them)."""
        await self.client.aio.aclose()
        await super().aclose()

    def close(self) -> None:
        """Nothing to do outside the event loop: the session belongs to it (see aclose)."""
