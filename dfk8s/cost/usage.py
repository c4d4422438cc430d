"""Actual usage from the providers' responses: tokens (text and image, in and out), images, requests.

The extractors take SDK objects or plain JSON dicts alike, so the SDK request path, a lean HTTP path and
the batch-mode result files all call the same functions.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass
class Usage:
    """Tokens and images a request (or a shard, or a run) used.

    Attributes:
        input_tokens: All input tokens (text and images).
        output_tokens: All output tokens (text and images).
        input_image_tokens: The part of ``input_tokens`` that were images (billed apart by image models).
        output_image_tokens: The part of ``output_tokens`` that were generated images.
        images: Images generated.
        requests: Requests answered.
        priced_images_usd: Images priced per image because the response had no token usage (dall-e).
        estimated: Requests whose answer came without the provider's usage: priced from what was asked
            (the images requested, the estimated tokens), never as free.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    input_image_tokens: int = 0
    output_image_tokens: int = 0
    images: int = 0
    requests: int = 0
    priced_images_usd: float = 0.0
    estimated: int = 0

    def add(self, other: Usage) -> Usage:
        """Add ``other`` into this one; returns self."""
        # Spelled out: this runs for every answered row, and dataclasses.fields() costs more than the sums.
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.input_image_tokens += other.input_image_tokens
        self.output_image_tokens += other.output_image_tokens
        self.images += other.images
        self.requests += other.requests
        self.priced_images_usd += other.priced_images_usd
        self.estimated += other.estimated
        return self

    def to_dict(self) -> dict:
        """JSON form (stored in part records, spend objects and done markers)."""
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "input_image_tokens": self.input_image_tokens,
                "output_image_tokens": self.output_image_tokens, "images": self.images,
                "requests": self.requests,
                "priced_images_usd": round(self.priced_images_usd, 6), "estimated": self.estimated}

    @classmethod
    def from_dict(cls, data: dict | None) -> Usage:
        """Parse :meth:`to_dict`'s output (unknown keys ignored)."""
        return cls(**{k: v for k, v in (data or {}).items() if k in _FIELDS})


_FIELDS = frozenset(f.name for f in fields(Usage))


def _get(obj: Any, *names: str, default: Any = None) -> Any:
    """A field of an SDK object or a dict, trying each name (snake and camel case)."""
    if obj is None:
        return default
    for name in names:
        value = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
        if value is not None:
            return value
    return default


def usage_from_openai_chat(usage: Any) -> Usage | None:
    """Usage of a chat completion (``usage.prompt_tokens`` / ``completion_tokens``); None without one."""
    if usage is None:
        return None
    return Usage(input_tokens=int(_get(usage, "prompt_tokens", default=0)),
                 output_tokens=int(_get(usage, "completion_tokens", default=0)), requests=1)


def usage_from_openai_images(usage: Any, images: int) -> Usage:
    """Usage of an images response (``usage`` is there for GPT image models, absent for dall-e)."""
    if usage is None:
        return Usage(images=images, requests=1)
    details = _get(usage, "input_tokens_details")
    output = int(_get(usage, "output_tokens", default=0))
    return Usage(input_tokens=int(_get(usage, "input_tokens", default=0)), output_tokens=output,
                 input_image_tokens=int(_get(details, "image_tokens", default=0)),
                 output_image_tokens=output, images=images, requests=1)


def usage_from_gemini(metadata: Any, images: int) -> Usage | None:
    """Usage of a generateContent answer (``usage_metadata``); None without one.

    Output tokens are split by ``candidates_tokens_details`` (modality IMAGE / TEXT); an answer without
    that split and with images counts all its output as image tokens (the dearer rate: never under).

    Args:
        metadata: ``usage_metadata`` (SDK object) or ``usageMetadata`` (JSON).
        images: Images in the answer.
    """
    if metadata is None:
        return None
    prompt = int(_get(metadata, "prompt_token_count", "promptTokenCount", default=0))
    output = int(_get(metadata, "candidates_token_count", "candidatesTokenCount", default=0)) + \
        int(_get(metadata, "thoughts_token_count", "thoughtsTokenCount", default=0))
    image_out = None
    for item in _get(metadata, "candidates_tokens_details", "candidatesTokensDetails", default=[]) or []:
        modality = str(getattr(_get(item, "modality"), "value", _get(item, "modality")) or "")
        if modality.upper() == "IMAGE":
            image_out = (image_out or 0) + int(_get(item, "token_count", "tokenCount", default=0))
    if image_out is None:
        image_out = output if images else 0
    return Usage(input_tokens=prompt, output_tokens=output, output_image_tokens=image_out, images=images,
                 requests=1)
