"""Input images: resolve a reference, read its bytes, check it decodes within limits, sniff its type."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import posixpath
import re
import urllib.parse
import warnings
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image

from dfk8s.errors import NotFound, StorageError
from dfk8s.run.layout import RUN_REF_SCHEME

#: Default limit on input image size, in pixels (Pillow's own bomb limit is ~89 Mpx).
DEFAULT_MAX_PIXELS = 40_000_000
#: Default limit on input image file size.
DEFAULT_MAX_BYTES = 50 * 1024 * 1024


class ImageProblem(ValueError):
    """An input image is missing, undecodable, too big or refused; the message names the reference.

    Attributes:
        type: The row's error type: ``BadImage``, ``BlockedAddress``, ``ImageFetchError``, ...
        details: Extra fields for the error record (``status``, ``url``, ...).
    """

    def __init__(self, message: str, type: str = "BadImage", details: dict | None = None):
        super().__init__(message)
        self.type = type
        self.details = details or {}


#: URL schemes a worker fetches images from (anything else with ``://`` but s3 is refused).
FETCH_SCHEMES = ("http", "https")


def is_http_url(ref) -> bool:
    """Whether an image reference is an http(s) URL (fetched by the workers, never staged)."""
    return isinstance(ref, str) and ref[:8].lower().startswith(("http://", "https://"))


def is_data_uri(ref) -> bool:
    """Whether an image reference is a ``data:`` URI (the image inline in the row)."""
    return isinstance(ref, str) and ref[:5].lower() == "data:"


def short_ref(ref) -> str:
    """A reference as messages show it: inline images (bytes, data: URIs) are not printed whole."""
    if isinstance(ref, bytes):
        return f"<{len(ref)} bytes>"
    if is_data_uri(ref) and len(ref) > 60:
        return f"{ref[:ref.find(',') + 1 if 0 < ref.find(',') < 40 else 30]}...({len(ref)} chars)"
    return ref


def decode_data_uri(ref: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of a ``data:[<mime>][;base64],<data>`` URI, within ``max_bytes``.

    Raises:
        ImageProblem: Not a well-formed data URI, or too big.
    """
    head, comma, payload = ref.partition(",")
    if not comma:
        raise ImageProblem("image data: URI has no ',' before its data")
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise ImageProblem(f"image data: URI holds over the {max_bytes} byte limit")
    try:
        if head.lower().endswith(";base64"):
            data = base64.b64decode(payload.strip(), validate=True)
        else:
            data = urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        raise ImageProblem("image data: URI is not valid base64") from None
    if len(data) > max_bytes:
        raise ImageProblem(f"image data: URI is {len(data)} bytes, over the {max_bytes} byte limit")
    return data


#: A plain http(s) URL, matched in one step (urlsplit costs ~10x more, and plans check millions).
_PLAIN_URL = re.compile(r"(?i)(https?)://(?:[^/?#@\s]*@)?(\[[0-9a-f:.]+\]|[^/?#:@\s\[\]]+)(?::(\d{1,5}))?"
                        r"(?:[/?#]\S*)?")


def url_host(ref: str) -> str:
    """Check an image URL's syntax and scheme and return its host (plan time: nothing is fetched).

    Raises:
        ImageProblem: ``BlockedAddress`` for a scheme other than http/https, ``BadImage`` for a URL
            without a host.
    """
    match = _PLAIN_URL.fullmatch(ref)
    if match and (not match.group(3) or int(match.group(3)) <= 65535):
        return match.group(2).strip("[]").lower()
    return check_url(ref).hostname


def check_url(ref: str) -> urllib.parse.SplitResult:
    """Check an image URL's syntax and scheme (plan time: nothing is fetched or resolved).

    Raises:
        ImageProblem: ``BlockedAddress`` for a scheme other than http/https, ``BadImage`` for a URL
            without a host.
    """
    try:
        parts = urllib.parse.urlsplit(ref)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise ImageProblem(f"image {ref} is not a valid URL: {exc}") from None
    if parts.scheme.lower() not in FETCH_SCHEMES:
        raise ImageProblem(f"image {ref}: scheme {parts.scheme!r} is refused (only http, https, s3)",
                           type="BlockedAddress", details={"url": ref})
    if not parts.hostname:
        raise ImageProblem(f"image {ref} is not a valid URL: no host")
    if any(c.isspace() for c in parts.hostname):
        raise ImageProblem(f"image {ref} is not a valid URL: a space in its host")
    return parts


@dataclass(frozen=True, slots=True)
class CheckedImage:
    """An image that decoded: its bytes, sniffed MIME type and size."""

    data: bytes
    mime: str
    width: int
    height: int
    ref: str

    @property
    def extension(self) -> str:
        """File extension for the sniffed type."""
        return _EXTENSIONS.get(self.mime, "bin")


_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif",
               "image/bmp": "bmp", "image/tiff": "tiff"}


def resolve_ref(ref: str, base_dir: str | None) -> str:
    """Turn a manifest image reference into an absolute path or a URI.

    Args:
        ref: As written in the row: relative path, absolute path or ``s3://`` URI.
        base_dir: Folder relative paths are taken from (``--image-root`` or the manifest's folder).
    """
    if "://" in ref or ref.startswith(RUN_REF_SCHEME) or is_data_uri(ref):
        return ref
    if base_dir and base_dir.startswith("s3://") and not ref.startswith(("/", "~")):
        # A manifest on S3 refers to its images relative to its own prefix.
        bucket, _, prefix = base_dir[len("s3://"):].partition("/")
        key = posixpath.normpath(posixpath.join(prefix, ref)).lstrip("/")
        return f"s3://{bucket}/{key}"
    path = os.path.expanduser(ref) if ref.startswith("~") else ref  # os.path: ~5x faster than pathlib here
    if not os.path.isabs(path):
        path = os.path.join(base_dir or ".", path)
    return os.path.abspath(path)


def check_image(data: bytes, ref: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> CheckedImage:
    """Check that ``data`` decodes as an image within ``max_pixels`` and sniff its MIME type.

    Raises:
        ImageProblem: It does not decode, or it is too big.
    """
    if not data:
        raise ImageProblem(f"image {ref} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height, fmt = img.width, img.height, img.format
                if width * height > max_pixels:
                    raise ImageProblem(f"image {ref} is {width}x{height}, over the {max_pixels} pixel limit")
                img.verify()  # checks integrity without a full decode
    except ImageProblem:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageProblem(f"image {ref} is over the pixel limit") from None
    except Exception as exc:  # Pillow raises many types for bad data
        raise ImageProblem(f"image {ref} does not decode: {type(exc).__name__}") from None
    mime = Image.MIME.get(fmt or "", "application/octet-stream")
    return CheckedImage(data, mime, width, height, ref)


def sniff_image(data: bytes, ref: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> CheckedImage:
    """Read an image's type and size from its header alone, for images a plan-time check already read.

    The worker uses this instead of :func:`check_image`: the plan decoded-checked the file, so reading
    its header again is enough to type the request (bytes the server cannot decode still fail their row
    with the server's message, never the shard).

    Raises:
        ImageProblem: The header is not an image's, or it is over the pixel limit.
    """
    if not data:
        raise ImageProblem(f"image {ref} is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:  # lazy: parses the header, decodes no pixels
            width, height, fmt = img.width, img.height, img.format
    except Exception as exc:  # Pillow raises many types for bad data
        raise ImageProblem(f"image {ref} does not decode: {type(exc).__name__}") from None
    if width * height > max_pixels:
        raise ImageProblem(f"image {ref} is {width}x{height}, over the {max_pixels} pixel limit")
    return CheckedImage(data, Image.MIME.get(fmt or "", "application/octet-stream"), width, height, ref)


def read_image(ref: str, *, run_storage=None, endpoint_url: str | None = None,
               max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS) -> CheckedImage:
    """Read and check one resolved image reference (local path, ``s3://`` URI or ``run:`` staged key).

    Raises:
        ImageProblem: The image is missing, too big or undecodable.
    """
    data = read_ref_bytes(ref, run_storage=run_storage, endpoint_url=endpoint_url, max_bytes=max_bytes)
    return check_image(data, ref, max_pixels=max_pixels)


def read_ref_bytes(ref: str, *, run_storage=None, endpoint_url: str | None = None,
                   max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Read the raw bytes behind an image reference, within ``max_bytes``."""
    try:
        if ref.startswith(RUN_REF_SCHEME):
            if run_storage is None:
                raise ImageProblem(f"image {ref} is staged in a run, but no run storage is open")
            data = run_storage.read_bytes(ref[len(RUN_REF_SCHEME):])
        elif ref.startswith("s3://"):
            bucket, _, key = ref[5:].partition("/")
            data = _bucket(bucket, endpoint_url).read_bytes(key)
        elif is_data_uri(ref):
            data = decode_data_uri(ref, max_bytes=max_bytes)
        elif is_http_url(ref):
            # Never a surprise download: the worker fetches on its loop with the run's guard (inputs.fetch);
            # code that means to fetch calls dfk8s.inputs.fetch.fetch_image_bytes.
            raise ImageProblem(f"image {ref} is a URL: the workers fetch it (inputs.fetch), it is not read "
                               "here", type="ImageFetchError", details={"url": ref})
        elif "://" in ref:
            scheme = ref.split("://", 1)[0]
            raise ImageProblem(f"image {ref}: scheme {scheme!r} is refused (only http, https, s3)",
                               type="BlockedAddress", details={"url": ref})
        else:
            size = os.path.getsize(ref)
            if size > max_bytes:
                raise ImageProblem(f"image {ref} is {size} bytes, over the {max_bytes} byte limit")
            with open(ref, "rb") as f:
                data = f.read()
    except (FileNotFoundError, NotFound):
        raise ImageProblem(f"image {ref} not found") from None
    except IsADirectoryError:
        raise ImageProblem(f"image {ref} is a folder") from None
    except StorageError as exc:
        raise ImageProblem(f"image {ref} cannot be read: {exc}") from None
    except OSError as exc:
        raise ImageProblem(f"image {ref} cannot be read: {exc.strerror}") from None
    if len(data) > max_bytes:
        raise ImageProblem(f"image {ref} is {len(data)} bytes, over the {max_bytes} byte limit")
    return data


@lru_cache(maxsize=16)
def _bucket(bucket: str, endpoint_url: str | None):
    from dfk8s.storage import open_storage

    return open_storage(f"s3://{bucket}", endpoint_url=endpoint_url)


def sha256_hex(data: bytes) -> str:
    """Content address of a staged image."""
    return hashlib.sha256(data).hexdigest()
