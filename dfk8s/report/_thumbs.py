"""Thumbnails of the sampled images, made with Pillow, a few at a time in threads."""

from __future__ import annotations

import hashlib
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image

from dfk8s.errors import Dfk8sError
from dfk8s.inputs.images import ImageProblem, read_ref_bytes

log = logging.getLogger(__name__)

#: Longest side of a thumbnail, in pixels (cards show them at up to half that, sharp on HiDPI screens).
THUMB_PX = 320


@dataclass
class Thumb:
    """One image's thumbnail (``data``: JPEG bytes) or why there is none (``problem``)."""

    ref: str
    name: str
    data: bytes | None = None
    problem: str | None = None
    width: int = 0
    height: int = 0


def thumb_name(data: bytes) -> str:
    """A thumbnail's file name, from the image's bytes (not its ref).

    A re-run that overwrites ``images/0/0.png`` gets a new thumbnail, never a stale one kept on S3; identical
    images share one.
    """
    return hashlib.sha256(data).hexdigest()[:24] + ".jpg"


def make_thumb(data: bytes, px: int = THUMB_PX) -> tuple[bytes, int, int]:
    """Scale image bytes down to at most ``px`` on the long side; return JPEG bytes and the original size."""
    with Image.open(io.BytesIO(data)) as img:
        size = img.size
        img.draft("RGB", (px * 2, px * 2))  # JPEG: decode at a reduced scale, much faster on big photos
        img.thumbnail((px, px))
        if img.mode in ("RGBA", "LA", "P", "PA"):
            rgba = img.convert("RGBA")
            flat = Image.new("RGB", rgba.size, (255, 255, 255))
            flat.paste(rgba, mask=rgba.getchannel("A"))
            img = flat
        elif img.mode != "RGB":
            img = img.convert("RGB")
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        return buf.getvalue(), size[0], size[1]


def make_thumbs(
    refs: list[str], *, run_storage, endpoint_url: str | None, threads: int = 8
) -> dict[str, Thumb]:
    """Read and thumbnail every ref once; a ref that cannot be read gets a ``problem``, never raises."""

    def one(ref: str) -> Thumb:
        thumb = Thumb(ref, "")
        try:
            data = read_ref_bytes(ref, run_storage=run_storage, endpoint_url=endpoint_url)
            thumb.name = thumb_name(data)
            thumb.data, thumb.width, thumb.height = make_thumb(data)
        except ImageProblem as exc:
            thumb.problem = str(exc)
        except Dfk8sError as exc:
            thumb.problem = f"image {ref} cannot be read: {exc}"
        except Exception as exc:  # Pillow raises many types for bad data
            thumb.problem = f"image {ref} does not decode: {type(exc).__name__}"
        if thumb.problem:
            log.info("no thumbnail: %s", thumb.problem)
        return thumb

    unique = list(dict.fromkeys(refs))
    if not unique:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(unique)))) as pool:
        return {t.ref: t for t in pool.map(one, unique)}
