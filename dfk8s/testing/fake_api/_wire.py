"""The wire pieces the fake API's endpoints share: knobs, fault triggers, images, request records."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import hashlib
import io
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

# Content triggers: a prompt containing one of these always gets that outcome, whatever the knobs say.
TRIGGERS = {
    "[[refuse]]": "refusal",
    "[[500]]": "500",
    "[[429]]": "429",
    "[[malformed]]": "malformed",
    "[[hang]]": "hang",
    "[[empty]]": "empty",
    "[[text_only]]": "text_only",
    "[[block]]": "block",
}
#: A counted trigger, ``[[500x3]]`` or ``[[429x2]]``: that distinct request fails its first N attempts with
#: that status, then succeeds (a transient fault that only some rows meet, e.g. for `dfk8s retry`).
COUNTED_TRIGGER = re.compile(r"\[\[(429|500|503)x(\d+)\]\]")
MALFORMED_BODY = '{"id": "fake-broken", "object": "chat.completion", "choices": [{"index": 0, "mess'
OPENAI_EDIT_MIMES = ("image/png", "image/jpeg", "image/webp")


@dataclass
class FakeConfig:
    """Fault and behaviour knobs; every field is also a CLI flag (`--rate-429`) and a `/_config` key.

    Attributes:
        latency: Seconds from an API request's arrival to its answer (reading and parsing the body
            included; the rest is an asyncio sleep, which costs no CPU).
        rate_429: Probability of a 429 carrying `Retry-After: retry_after`.
        retry_after: Seconds sent in the `Retry-After` header of every 429.
        rate_5xx: Probability of a 500 or 503.
        rate_hang: Probability of sleeping `hang_seconds` (the client should time out first).
        hang_seconds: How long a hang lasts; afterwards the server answers 504.
        rate_malformed: Probability of a 200 whose body is not valid JSON.
        rate_empty: Probability of a 200 with no result (`choices: []`, `data: []`, `candidates: []`).
        rate_refusal: Probability of a refusal (chat `refusal`, images 400 content_policy_violation,
            Gemini `finishReason: SAFETY`).
        text_only: Probability that Gemini answers with a text part only, no image.
        fail_first: Every distinct request (same texts and images) gets a 429 on its first
            `fail_first` attempts, then succeeds: retry counts become exact.
        seed: Seed of the random generator behind the `rate_*` knobs.
        image_size: Longest side, in pixels, of the PNGs the server makes.
        keep_bodies: Keep the raw bytes and headers of the last `keep_bodies` API requests (`bodies()`),
            so tests can compare what two clients sent, byte for byte.
        models: Comma-separated model names the server knows; any other gets 404 `model_not_found`
            (OpenAI) or `NOT_FOUND` (Gemini), as the real APIs answer. Empty: every name is served.
        api_key: When set, a request with another key gets 401 `invalid_api_key` (Gemini: 400
            `API_KEY_INVALID`), as the real APIs answer.
        decode_images: 1: decode every input image fully (a broken one gets 400); 0: read headers only,
            so a benchmark with big photos measures the client, not the fake's JPEG decoder.
        batch_seconds: Seconds a batch takes from create to completed (0: one state further per poll).
        batch_line_fail: Probability that one line of a batch fails (a 500 in the error file).
        batch_expire: 1 makes batches expire with half their lines done (see `batch.py`).
    """

    latency: float = 0.0
    rate_429: float = 0.0
    retry_after: float = 1.0
    rate_5xx: float = 0.0
    rate_hang: float = 0.0
    hang_seconds: float = 3600.0
    rate_malformed: float = 0.0
    rate_empty: float = 0.0
    rate_refusal: float = 0.0
    text_only: float = 0.0
    fail_first: int = 0
    seed: int = 0
    image_size: int = 64
    keep_bodies: int = 0
    models: str = ""
    api_key: str = ""
    decode_images: int = 1
    batch_seconds: float = 0.0
    batch_line_fail: float = 0.0
    batch_expire: int = 0

    def update(self, **changes: Any) -> None:
        """Sets knobs by name, converting values to the field's type.

        Raises:
            ValueError: For an unknown knob or a value of the wrong kind.
        """
        types = {f.name: KNOB_TYPES[f.type] for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - set(types))
        if unknown:
            raise ValueError(f"unknown knob(s): {', '.join(unknown)}; known: {', '.join(types)}")
        for name, value in changes.items():
            setattr(self, name, types[name](value))


KNOB_TYPES = {"float": float, "int": int, "str": str}


class ApiError(Exception):
    """A client-visible error, rendered in the OpenAI or the Gemini error shape by the server."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_


@dataclass
class InImage:
    """One input image as it arrived: where from, the MIME type the client declared, the bytes."""

    where: str
    mime: str
    data: bytes
    fmt: str = ""
    size: tuple[int, int] = (0, 0)

    def describe(self) -> str:
        """`64x64 png`: the size and sniffed format, as replies echo them."""
        return f"{self.size[0]}x{self.size[1]} {self.fmt}"


@dataclass
class Call:
    """What one API request asks for, whichever wire format carried it."""

    endpoint: str
    model: str
    texts: list[str]
    prompt: str
    system: str | None = None
    images: list[InImage] = field(default_factory=list)
    mask: InImage | None = None
    params: dict[str, Any] = field(default_factory=dict)
    turns: int = 1

    def key(self) -> str:
        """Digest of the request's content; the same texts and images give the same key."""
        h = hashlib.sha256()
        for text in self.texts:
            h.update(text.encode() + b"\0")
        for img in self.images + ([self.mask] if self.mask else []):
            h.update(hashlib.sha256(img.data).digest())
        return h.hexdigest()

    def trigger(self) -> str | None:
        """The fault a `[[...]]` marker in the request's texts asks for, or None."""
        joined = "\n".join(self.texts)
        return next((mode for marker, mode in TRIGGERS.items() if marker in joined), None)


@functools.lru_cache(maxsize=2048)
def make_png(key: str, width: int, height: int) -> bytes:
    """A small real PNG whose colours and shapes come from `key`'s hash (same key, same bytes)."""
    digest = hashlib.sha256(key.encode()).digest()
    img = Image.new("RGB", (width, height), tuple(digest[0:3]))
    draw = ImageDraw.Draw(img)
    for i in range(4):
        b = digest[3 + 7 * i: 10 + 7 * i]
        x0, y0 = b[0] * width // 256, b[1] * height // 256
        x1, y1 = x0 + 1 + b[2] * width // 512, y0 + 1 + b[3] * height // 512
        draw.rectangle((x0, y0, x1, y1), fill=(b[4], b[5], b[6]))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def scaled(width: float, height: float, limit: int) -> tuple[int, int]:
    """(width, height) scaled so the longest side is `limit`, aspect ratio kept."""
    if width <= 0 or height <= 0:
        return limit, limit
    k = limit / max(width, height)
    return max(1, round(width * k)), max(1, round(height * k))


def size_from(spec: Any, limit: int, sep: str = "x") -> tuple[int, int] | None:
    """Output size for a `1536x1024` (or `16:9` with sep=":") request, None when it names no size."""
    try:
        w, h = (float(v) for v in str(spec).lower().split(sep))
    except ValueError:
        return None
    return scaled(w, h, limit)


def inspect_image(img: InImage, check_mime: bool = True, decode: bool = True) -> None:
    """Decodes `img` with Pillow and fills in its format and size.

    Args:
        img: The image as it arrived.
        check_mime: Also check the declared MIME type against the bytes.
        decode: Decode every pixel (False: read the header only, for benchmarks with big photos).

    Raises:
        ApiError: 400 when the bytes do not decode, or do not match the declared MIME type.
    """
    try:
        with Image.open(io.BytesIO(img.data)) as im:
            if decode:
                im.load()
            img.fmt, img.size = (im.format or "").lower(), im.size
    except Exception as exc:  # Pillow raises many kinds; all mean "not an image we can read"
        raise ApiError(400, f"Invalid image at {img.where}: the data could not be decoded as an image "
                            f"({type(exc).__name__}).", code="invalid_image", param=img.where) from None
    sniffed = Image.MIME.get(img.fmt.upper(), f"image/{img.fmt}")
    declared = "image/jpeg" if img.mime.lower() == "image/jpg" else img.mime.lower()
    if check_mime and declared != sniffed:
        raise ApiError(400, f"Invalid image at {img.where}: declared MIME type {img.mime!r} but the data "
                            f"is {sniffed!r}.", code="invalid_image_format", param=img.where)


async def fetch_loopback_image(url: str, where: str) -> InImage:
    """Fetch an image URL the way a provider would, but only from loopback (tests never leave the host).

    Raises:
        ApiError: 400 when the URL is not on loopback or cannot be downloaded.
    """
    import ipaddress
    from urllib.parse import urlsplit

    import aiohttp

    host = urlsplit(url).hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ApiError(400, f"Invalid image at {where}: the fake server fetches only loopback IP URLs.",
                       code="invalid_image_url", param=where)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session, \
                session.get(url) as response:
            if response.status != 200:
                raise ApiError(400, f"Timeout while downloading {url} (HTTP {response.status}).",
                               code="invalid_image_url", param=where)
            data = await response.read()
            mime = response.headers.get("Content-Type", "")
    except aiohttp.ClientError as exc:
        raise ApiError(400, f"Error while downloading {url}: {type(exc).__name__}.",
                       code="invalid_image_url", param=where) from None
    return InImage(where, mime, data)


def b64decode(data: Any, where: str, urlsafe: bool = False) -> bytes:
    """Strict base64 decoding, as the real APIs do it.

    Args:
        data: The base64 text.
        where: Where it sits in the request, for the error message.
        urlsafe: Also accept `-_` and missing padding (protobuf JSON, which Gemini and its SDK use).

    Raises:
        ApiError: 400 for data that is not base64.
    """
    try:
        if urlsafe:
            data = str(data) + "=" * (-len(str(data)) % 4)
            return base64.b64decode(data, altchars=b"-_", validate=True)
        return base64.b64decode(data, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise ApiError(400, f"Invalid base64 image data at {where}.", code="invalid_image",
                       param=where) from None


def truncate(obj: Any) -> Any:
    """A copy of a JSON value with image payloads shortened, so the request log stays small."""
    if isinstance(obj, dict):
        return {k: (f"<{len(v)} base64 chars>" if k in ("data", "b64_json") and isinstance(v, str)
                    and len(v) > 64 else truncate(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [truncate(v) for v in obj]
    if isinstance(obj, str) and obj.startswith("data:") and len(obj) > 64:
        head, _, tail = obj.partition(",")
        return f"{head},<{len(tail)} chars>"
    return obj


def words(text: str) -> int:
    """Count the whitespace-separated words in `text`: the fakes' token count."""
    return len(text.split())
