"""What each image API model accepts, checked before a single request is sent.

The tables follow the installed SDKs' own type hints and docstrings (openai:
``types/image_generate_params.py``, ``image_edit_params.py``, ``image_model.py``; google-genai:
``types.py`` ``ImageConfig``) plus the vendors' model pages. A model that is not in a table is passed
through unchecked (an OpenAI- or Gemini-compatible server may serve any name), with a warning.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass

from dfk8s.errors import SpecError
from dfk8s.inputs.images import ImageProblem, check_image
from dfk8s.servings.api import RetryableError
from dfk8s.servings.base import ImageInput

log = logging.getLogger(__name__)

# ----- OpenAI images ---------------------------------------------------------------------------------

_GPT_SIZES = ("auto", "1024x1024", "1536x1024", "1024x1536")
_GPT_QUALITIES = ("auto", "low", "medium", "high")
_GPT_EDIT_MIMES = ("image/png", "image/jpeg", "image/webp")
_MB = 1024 * 1024
#: Largest free-form size the GPT image 2 family documents (``3840x2160``), as edge and pixel limits.
FREE_SIZE_MAX_EDGE = 3840
FREE_SIZE_MAX_PIXELS = 3840 * 2160


@dataclass(frozen=True)
class OpenAIImageModel:
    """The rules of one OpenAI image model.

    Attributes:
        name: Model name as sent.
        sizes: Accepted ``size`` values.
        free_size: Also accepts any ``WxH`` with both sides multiples of 16, aspect ratio within 1:3..3:1,
            at most 3840 on the long edge and 3840x2160 pixels (the GPT image 2 family).
        qualities: Accepted ``quality`` values.
        max_n: Most images per request (``n``).
        response_format: Accepts ``response_format`` (the DALL-E models; GPT image models always
            answer base64 and reject the parameter).
        edits: Has an ``images.edit`` endpoint.
        max_edit_images: Input images one edit takes.
        edit_mimes: Input image types an edit takes.
        edit_max_bytes: Largest input image (and mask) file.
        edit_square: Input images must be square (DALL-E 2).
        max_prompt_chars: Longest prompt.
        retired: Set when the SDK documents the model as retired or shut down (a warning, not an error:
            compatible servers still serve these names).

    """

    name: str
    sizes: tuple[str, ...]
    qualities: tuple[str, ...]
    max_n: int = 10
    free_size: bool = False
    response_format: bool = False
    edits: bool = True
    max_edit_images: int = 16
    edit_mimes: tuple[str, ...] = _GPT_EDIT_MIMES
    edit_max_bytes: int = 50 * _MB
    edit_square: bool = False
    max_prompt_chars: int = 32000
    retired: str = ""


def _gpt(name: str, *, free_size: bool = False, extra_qualities: tuple[str, ...] = (), retired: str = ""):
    return OpenAIImageModel(name, _GPT_SIZES, _GPT_QUALITIES + extra_qualities, free_size=free_size,
                            retired=retired)


OPENAI_MODELS: dict[str, OpenAIImageModel] = {m.name: m for m in (
    OpenAIImageModel("dall-e-2", ("256x256", "512x512", "1024x1024"), ("auto", "standard"),
                     response_format=True, max_edit_images=1, edit_mimes=("image/png",),
                     edit_max_bytes=4 * _MB, edit_square=True, max_prompt_chars=1000,
                     retired="retired on 2026-05-12"),
    OpenAIImageModel("dall-e-3", ("1024x1024", "1792x1024", "1024x1792"), ("auto", "standard", "hd"),
                     max_n=1, response_format=True, edits=False, max_prompt_chars=4000,
                     retired="retired on 2026-05-12"),
    _gpt("gpt-image-1", retired="shut down on 2026-10-23"),
    _gpt("gpt-image-1-mini"),
    _gpt("gpt-image-1.5"),
    _gpt("chatgpt-image-latest"),
    _gpt("gpt-image-2", free_size=True),
    _gpt("gpt-image-2-2026-04-21", free_size=True),
    *(_gpt(name, free_size=True, extra_qualities=("xhigh", "max")) for name in (
        "gpt-image-2.5-sunburst", "gpt-image-2.5-sunburst-2026-09-08", "gpt-image-2.5-flare",
        "gpt-image-2.5-flare-2026-09-08",
        # The SDK lists the 2.6 models without their own rules; they get the 2.5 family's.
        "gpt-image-2.6-sunburst", "gpt-image-2.6-flare")),
)}

_WXH = re.compile(r"^(\d+)x(\d+)$")


def _free_size_ok(size: str) -> bool:
    match = _WXH.match(size)
    if not match:
        return False
    w, h = int(match.group(1)), int(match.group(2))
    return (w >= 16 and h >= 16 and w % 16 == 0 and h % 16 == 0 and 1 / 3 <= w / h <= 3
            and max(w, h) <= FREE_SIZE_MAX_EDGE and w * h <= FREE_SIZE_MAX_PIXELS)


@dataclass(frozen=True)
class OpenAIImageParams:
    """Checked request parameters for one run (None: not sent, the API's default applies)."""

    model: str
    rules: OpenAIImageModel | None
    n: int = 1
    size: str | None = None
    quality: str | None = None
    response_format: str | None = None


def check_openai(model: str, *, pipeline: str, n: int | None, size: str | None, quality: str | None,
                 response_format: str | None, mask: bool) -> OpenAIImageParams:
    """Check the options against ``model``'s rules.

    Args:
        model: Model name.
        pipeline: ``text2image`` (images.generate) or ``imageedit`` (images.edit).
        n: Images per prompt (None: 1).
        response_format: ``b64_json`` or ``url`` (None: ``b64_json`` for models that take it).
        mask: Whether a mask is configured.
        quality: As given by the user (None: not sent).
        size: As given by the user (None: not sent).

    Raises:
        SpecError: One line naming the model, the bad value and the allowed values.

    """
    n = 1 if n is None else int(n)
    if response_format is not None and response_format not in ("b64_json", "url"):
        raise SpecError(f"openai-images: response_format {response_format!r} is not one of b64_json, url")
    if mask and pipeline != "imageedit":
        raise SpecError("openai-images: --mask applies to the imageedit pipeline only")
    rules = OPENAI_MODELS.get(model)
    if rules is None:
        log.warning("openai-images: model %r is not in the known-model table; size, quality and n are "
                    "sent unchecked", model)
        if not 1 <= n <= 10:
            raise SpecError(f"openai-images: images per prompt {n} is outside 1..10")
        return OpenAIImageParams(model, None, n, size, quality, response_format)
    if rules.retired:
        log.warning("openai-images: %s was %s (per the openai SDK); only compatible servers still serve it",
                    model, rules.retired)
    if pipeline == "imageedit" and not rules.edits:
        editable = ", ".join(name for name, r in OPENAI_MODELS.items() if r.edits)
        raise SpecError(f"openai-images: {model} cannot edit images; models with edits: {editable}")
    if not 1 <= n <= rules.max_n:
        allowed = "1" if rules.max_n == 1 else f"1..{rules.max_n}"
        raise SpecError(f"openai-images: {model} takes {allowed} images per prompt, not {n}")
    sizes = rules.sizes
    if size is not None and size not in sizes and not (rules.free_size and _free_size_ok(size)):
        extra = (" or WxH (multiples of 16, aspect 1:3..3:1, up to 3840x2160)" if rules.free_size else "")
        raise SpecError(f"openai-images: {model} size {size!r} is not one of {', '.join(sizes)}{extra}")
    if quality is not None and quality not in rules.qualities:
        raise SpecError(f"openai-images: {model} quality {quality!r} is not one of "
                        f"{', '.join(rules.qualities)}")
    if rules.response_format:
        response_format = response_format or "b64_json"
    elif response_format is not None:
        raise SpecError(f"openai-images: {model} always answers base64 and takes no response_format "
                        f"(only dall-e-2 and dall-e-3 do)")
    return OpenAIImageParams(model, rules, n, size, quality, response_format)


# ----- Gemini images ---------------------------------------------------------------------------------

#: The Gemini API's image aspect ratios (the SDK docstring lists eight; the API also takes 4:5 and 5:4).
GEMINI_ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")


@dataclass(frozen=True)
class GeminiImageModel:
    """The rules of one Gemini image model: its aspect ratios and image sizes (empty: not settable)."""

    name: str
    aspect_ratios: tuple[str, ...] = GEMINI_ASPECT_RATIOS
    image_sizes: tuple[str, ...] = ()


GEMINI_MODELS: dict[str, GeminiImageModel] = {m.name: m for m in (
    GeminiImageModel("gemini-2.5-flash-image"),
    GeminiImageModel("gemini-2.5-flash-image-preview"),
    GeminiImageModel("gemini-3-pro-image-preview", image_sizes=("1K", "2K", "4K")),
)}


@dataclass(frozen=True)
class GeminiImageParams:
    """Checked image config for one run (None: not sent)."""

    model: str
    aspect_ratio: str | None = None
    image_size: str | None = None


def check_gemini(model: str, *, aspect_ratio: str | None, image_size: str | None,
                 n: int | None) -> GeminiImageParams:
    """Check the options against ``model``'s rules.

    Raises:
        SpecError: One line naming the model, the bad value and the allowed values.

    """
    if n is not None and int(n) != 1:
        raise SpecError(f"gemini-images: {model} returns one image per request; images per prompt must be 1, "
                        f"not {n}")
    if image_size is not None:
        image_size = str(image_size).upper()  # the API wants an upper-case K; accept "2k" too
    rules = GEMINI_MODELS.get(model.removeprefix("models/"))
    if rules is None:
        log.warning("gemini-images: model %r is not in the known-model table; aspect ratio and image size "
                    "are sent unchecked", model)
        return GeminiImageParams(model, aspect_ratio, image_size)
    if aspect_ratio is not None and aspect_ratio not in rules.aspect_ratios:
        raise SpecError(f"gemini-images: {model} aspect ratio {aspect_ratio!r} is not one of "
                        f"{', '.join(rules.aspect_ratios)}")
    if image_size is not None and image_size not in rules.image_sizes:
        if not rules.image_sizes:
            sized = ", ".join(name for name, r in GEMINI_MODELS.items() if r.image_sizes)
            raise SpecError(f"gemini-images: {model} takes no image size (only {sized} does); "
                            "drop --image-size")
        raise SpecError(f"gemini-images: {model} image size {image_size!r} is not one of "
                        f"{', '.join(rules.image_sizes)}")
    return GeminiImageParams(model, aspect_ratio, image_size)


# ----- helpers both image servings use -----------------------------------------------------------------


def as_png(image: ImageInput) -> ImageInput:
    """Return the image re-encoded as PNG, for a format the API does not take (GIF, BMP, TIFF)."""
    from PIL import Image

    with Image.open(io.BytesIO(image.data)) as img:
        buf = io.BytesIO()
        img.save(buf, "PNG")
    return ImageInput(buf.getvalue(), "image/png", image.ref, image.width, image.height)


def returned_image(data: bytes, where: str) -> bytes:
    """Check that image bytes an API returned decode; a broken answer is worth another attempt.

    Raises:
        RetryableError: ``MalformedResponse`` when the bytes are empty or do not decode.

    """
    try:
        check_image(data, where)
    except ImageProblem as exc:
        raise RetryableError("MalformedResponse", str(exc)) from None
    return data
