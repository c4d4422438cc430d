"""Input images: resolve a reference, read its bytes, check it decodes within limits, sniff its type."""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image

from dfk8s.errors import NotFound, StorageError
from dfk8s.layout import RUN_REF_SCHEME

#: Default limit on input image size, in pixels (Pillow's own bomb limit is ~89 Mpx).
DEFAULT_MAX_PIXELS = 40_000_000
#: Default limit on input image file size.
DEFAULT_MAX_BYTES = 50 * 1024 * 1024


class ImageProblem(ValueError):
    """An input image is missing, undecodable or too big; the message names the reference."""


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
    if "://" in ref or ref.startswith(RUN_REF_SCHEME):
        return ref
    if base_dir and base_dir.startswith("s3://") and not ref.startswith(("/", "~")):
        # A manifest on S3 refers to its images relative to its own prefix.
        bucket, _, prefix = base_dir[len("s3://"):].partition("/")
        key = posixpath.normpath(posixpath.join(prefix, ref)).lstrip("/")
        return f"s3://{bucket}/{key}"
    path = Path(ref).expanduser()
    if not path.is_absolute():
        path = Path(base_dir or ".") / path
    return os.path.normpath(path.absolute())


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
        elif "://" in ref:
            raise ImageProblem(f"image {ref}: only local paths and s3:// URIs are supported")
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
