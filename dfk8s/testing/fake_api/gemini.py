"""Gemini `models/{model}:generateContent` for the fake API server: read the request, shape the reply.

The server core (faults, counters, image checks) is `fake_api.FakeAPI`; this module only knows Gemini's
JSON. Gemini accepts both camelCase and snake_case field names, so the fake does too.
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

from aiohttp import web

from dfk8s.testing.fake_api._wire import (
    ApiError,
    Call,
    InImage,
    b64decode,
    make_png,
    scaled,
    size_from,
    truncate,
    words,
)

# google.rpc.Code names, as Gemini puts them in `error.status`.
STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def error_body(status: int, message: str, retry_delay: str | None = None) -> dict[str, Any]:
    """Gemini's error JSON: `{"error": {"code", "message", "status"[, "details"]}}`.

    Args:
        status: HTTP status.
        message: Human-readable message.
        retry_delay: For a 429, the delay as Gemini writes it (`"7s"`), sent as a google.rpc.RetryInfo detail.
    """
    error: dict[str, Any] = {"code": status, "message": message,
                             "status": STATUS_NAMES.get(status, "UNKNOWN")}
    if retry_delay is not None:
        error["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay}]
    return {"error": error}


def _get(obj: dict[str, Any], camel: str, snake: str, default: Any = None) -> Any:
    return obj.get(camel, obj.get(snake, default))


async def parse(api: Any, request: web.Request, entry: dict[str, Any]) -> Call:
    """Reads a generateContent request into a `Call`.

    Raises:
        ApiError: 400 (or 404 for another method) in terms Gemini would use.
    """
    model, _, method = request.match_info["target"].partition(":")
    if method != "generateContent":
        raise ApiError(404, f"Method {method!r} is not served by the fake (only generateContent).")
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, "Invalid JSON payload received.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "Invalid JSON payload received: the body must be an object.")
    entry["body"] = truncate(body)
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise ApiError(400, "* GenerateContentRequest.contents: contents is not specified")
    texts: list[str] = []
    images: list[InImage] = []
    prompt = ""
    for i, content in enumerate(contents):
        mine = []
        for j, part in enumerate(content.get("parts") or []):
            where = f"contents[{i}].parts[{j}]"
            blob = _get(part, "inlineData", "inline_data")
            if "text" in part:
                mine.append(str(part["text"]))
            elif isinstance(blob, dict):
                data = b64decode(blob.get("data", ""), where, urlsafe=True)
                images.append(InImage(where, str(_get(blob, "mimeType", "mime_type", "")), data))
            else:
                raise ApiError(400, f"{where}: the fake serves only text and inline_data parts.")
        texts += mine
        if content.get("role", "user") == "user":
            prompt = "\n".join(mine)
    system_parts = (_get(body, "systemInstruction", "system_instruction") or {}).get("parts") or []
    system = "\n".join(str(p.get("text", "")) for p in system_parts) or None
    config = _get(body, "generationConfig", "generation_config") or {}
    image_config = _get(config, "imageConfig", "image_config") or {}
    params = {"response_modalities": _get(config, "responseModalities", "response_modalities"),
              "aspect_ratio": _get(image_config, "aspectRatio", "aspect_ratio"),
              "image_size": _get(image_config, "imageSize", "image_size"),
              "temperature": config.get("temperature"),
              "max_output_tokens": _get(config, "maxOutputTokens", "max_output_tokens")}
    return Call("gemini.generateContent", model, texts + ([system] if system else []), prompt, system, images,
                params=params, turns=len(contents))


def reply(api: Any, request: web.Request, call: Call, mode: str | None) -> dict[str, Any]:
    """The GenerateContentResponse JSON for `call`, shaped by the fault `mode` (None for a clean answer)."""
    described = "".join(f", {img.describe()}" for img in call.images)
    text = (f"fake gemini: {call.prompt[:60]} (turns: {call.turns}, images: {len(call.images)}{described}; "
            f"system: {'yes' if call.system else 'no'})")
    modalities = [str(m).upper() for m in call.params.get("response_modalities") or []]
    # Without responseModalities an image model answers with an image, as gemini-*-image models do.
    wants_image = "IMAGE" in modalities or (not modalities and "image" in call.model)
    prompt_tokens = sum(words(t) for t in call.texts) + 258 * len(call.images)
    out: dict[str, Any] = {"modelVersion": call.model, "responseId": uuid.uuid4().hex[:22]}
    if mode == "block":
        out.update(promptFeedback={"blockReason": "SAFETY"},
                   usageMetadata={"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens})
        return out
    if mode == "empty":
        candidates: list[dict[str, Any]] = []
    elif mode == "refusal":
        candidates = [{"finishReason": "SAFETY", "index": 0, "safetyRatings": [
            {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}]}]
    else:
        parts: list[dict[str, Any]] = []
        if modalities != ["IMAGE"] or mode == "text_only":  # IMAGE alone means no text, as the real API does
            parts.append({"text": text})
        if wants_image and mode != "text_only":
            limit = api.config.image_size
            size = size_from(call.params.get("aspect_ratio"), limit, sep=":") or (
                scaled(*call.images[0].size, limit) if call.images else (limit, limit))
            png = make_png(call.key(), *size)
            parts.append({"inlineData": {"mimeType": "image/png", "data": base64.b64encode(png).decode()}})
        candidates = [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}]
    parts = [p for c in candidates for p in (c.get("content") or {}).get("parts", [])]
    text_tokens = words(text) if any("text" in p for p in parts) else 0
    image_tokens = 1290 * sum(1 for p in parts if "inlineData" in p)  # what one 1024px image costs
    output_tokens = text_tokens + image_tokens
    details = [{"modality": m, "tokenCount": n} for m, n in (("TEXT", text_tokens), ("IMAGE", image_tokens))
               if n]
    text_in = sum(words(t) for t in call.texts)
    prompt_details = [{"modality": "TEXT", "tokenCount": text_in}] + (
        [{"modality": "IMAGE", "tokenCount": 258 * len(call.images)}] if call.images else [])
    out.update(candidates=candidates, usageMetadata={
        "promptTokenCount": prompt_tokens, "candidatesTokenCount": output_tokens,
        "totalTokenCount": prompt_tokens + output_tokens, "promptTokensDetails": prompt_details,
        **({"candidatesTokensDetails": details} if details else {})})
    return out
