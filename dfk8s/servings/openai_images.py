"""text2image and imageedit through the OpenAI Images API (``images.generate`` / ``images.edit``).

Per-model rules (sizes, quality, images per prompt, response format, edit inputs) live in
:mod:`dfk8s.servings.image_models` and are checked in :meth:`OpenAIImagesServing.from_spec`, before any
request is sent. Retries, the in-flight limit and ``--rpm`` come from :class:`ApiServing`.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os

from dfk8s.cost.usage import usage_from_openai_images
from dfk8s.errors import SpecError, retry_after_seconds
from dfk8s.inputs.images import ImageProblem, check_image, read_ref_bytes, resolve_ref
from dfk8s.servings import SERVINGS
from dfk8s.servings.api import ApiOptions, ApiServing, RetryableError, RowFailure
from dfk8s.servings.base import ImageInput, Request, Response
from dfk8s.servings.image_models import OpenAIImageParams, as_png, check_openai, returned_image
from dfk8s.servings.openai_common import make_client, openai_errors

log = logging.getLogger(__name__)

DEFAULT_MODEL = SERVINGS["openai-images"].defaults["model"]
#: Largest image accepted from a response URL.
MAX_DOWNLOAD_BYTES = 50 * 1024 * 1024
#: Largest mask file the API takes.
MAX_MASK_BYTES = 4 * 1024 * 1024
_EXT = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


def load_mask(ref: str) -> tuple[bytes, int, int]:
    """Read and check the ``--mask`` PNG (local path or s3:// URI).

    Returns:
        The bytes and the mask's width and height.

    Raises:
        SpecError: Missing, not a PNG, over 4 MB, or without an alpha channel (the transparent pixels
            are what marks the area to edit).

    """
    from PIL import Image

    try:
        data = read_ref_bytes(resolve_ref(ref, None), endpoint_url=os.environ.get("AWS_ENDPOINT_URL"),
                              max_bytes=MAX_MASK_BYTES)
        checked = check_image(data, ref)
    except ImageProblem as exc:
        raise SpecError(f"openai-images: mask: {exc}") from None
    if checked.mime != "image/png":
        raise SpecError(f"openai-images: mask {ref} must be a PNG, not {checked.mime}")
    with Image.open(io.BytesIO(data)) as img:
        has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
    if not has_alpha:
        raise SpecError(f"openai-images: mask {ref} has no alpha channel; its fully transparent pixels mark "
                        "the area to edit")
    return data, checked.width, checked.height


def decode_b64(text: str, where: str) -> bytes:
    """Strict base64 decoding of a returned image."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RetryableError("MalformedResponse", f"{where} is not valid base64") from None
    return returned_image(data, where)


async def download_image(url: str, *, timeout: float, max_bytes: int = MAX_DOWNLOAD_BYTES) -> bytes:
    """Fetch an image the API answered with as a URL: bounded in time and size, never with our API key.

    Raises:
        RetryableError: Timeouts, connection errors, 408/429/5xx, a body that does not decode.
        RowFailure: Another HTTP status, an unsupported scheme, or a body over ``max_bytes``.

    """
    if url.startswith("data:"):
        head, _, payload = url.partition(",")
        if ";base64" not in head:
            raise RowFailure("DownloadFailed", "a data: URL without base64 payload")
        return decode_b64(payload, "the returned data URL")
    if not url.startswith(("http://", "https://")):
        raise RowFailure("DownloadFailed", f"unsupported image URL scheme: {url[:80]}")
    import aiohttp

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            async with session.get(url) as response:
                if response.status in (408, 429) or response.status >= 500:
                    raise RetryableError("DownloadFailed", f"image download: HTTP {response.status}",
                                         retry_after_seconds(response.headers.get("Retry-After")))
                if response.status != 200:
                    raise RowFailure("DownloadFailed", f"image download: HTTP {response.status}",
                                     {"status": response.status})
                if (response.content_length or 0) > max_bytes:
                    raise RowFailure("DownloadFailed", f"image download: {response.content_length} bytes, "
                                                       f"over the {max_bytes} byte limit")
                chunks, size = [], 0
                async for chunk in response.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    if size > max_bytes:
                        raise RowFailure("DownloadFailed", f"image download: over the {max_bytes} byte limit")
                    chunks.append(chunk)
    except TimeoutError:
        raise RetryableError("Timeout", "image download timed out") from None
    except aiohttp.ClientError as exc:
        raise RetryableError("ConnectionError", f"image download: {type(exc).__name__}: {exc}") from None
    return returned_image(b"".join(chunks), "the downloaded image")


class OpenAIImagesServing(ApiServing):
    """OpenAI images: generations for text2image rows, edits for imageedit rows."""

    name = "openai-images"

    def __init__(self, options: ApiOptions, params: OpenAIImageParams, *, edit: bool = False,
                 mask: tuple[bytes, int, int] | None = None):
        super().__init__(options)
        self.params = params
        self.edit = edit
        self.mask = mask
        self.client = make_client(options)

    @classmethod
    def from_spec(cls, spec) -> OpenAIImagesServing:
        """Check the options against the model's rules (SpecError before any request) and build."""
        options = ApiOptions.from_spec(spec)
        if spec.pipeline not in ("text2image", "imageedit"):
            raise SpecError(f"openai-images runs text2image and imageedit, not {spec.pipeline}")
        mask_ref = spec.option("mask")
        if mask_ref and spec.option("max_image_side"):
            raise SpecError("openai-images: --mask and --max-image-side exclude each other (the mask must "
                            "match the image size the API receives)")
        params = check_openai(options.model, pipeline=spec.pipeline, n=spec.option("images_per_prompt"),
                              size=spec.option("size"), quality=spec.option("quality"),
                              response_format=spec.option("response_format"), mask=bool(mask_ref))
        mask = load_mask(mask_ref) if mask_ref else None
        return cls(options, params, edit=spec.pipeline == "imageedit", mask=mask)

    def _common(self) -> dict:
        p = self.params
        args = {"model": p.model, "n": p.n}
        for key in ("size", "quality", "response_format"):
            if getattr(p, key) is not None:
                args[key] = getattr(p, key)
        return args

    def _check_prompt(self, prompt: str) -> None:
        if not prompt.strip():
            raise RowFailure("BadInput", "the row has no prompt (no user turn with text)")
        rules = self.params.rules
        if rules is not None and len(prompt) > rules.max_prompt_chars:
            raise RowFailure("BadInput", f"the prompt has {len(prompt)} characters; {rules.name} takes at "
                                         f"most {rules.max_prompt_chars}")

    def _edit_files(self, images: list[ImageInput]) -> list[tuple[str, bytes, str]]:
        """Return the row's images as multipart files, checked against the model's edit rules."""
        rules = self.params.rules
        if not images:
            raise RowFailure("BadInput", "imageedit needs an input image")
        if rules is None:
            return [(f"image-{k}.{_EXT.get(img.mime, 'png')}", img.data, img.mime)
                    for k, img in enumerate(images)]
        if len(images) > rules.max_edit_images:
            raise RowFailure("BadInput", f"{rules.name} edits take at most {rules.max_edit_images} input "
                                         f"image(s); the row has {len(images)}")
        files = []
        for k, img in enumerate(images):
            if img.mime not in rules.edit_mimes:
                img = as_png(img)  # GIF, BMP, TIFF ...: the API takes PNG
            if img.mime not in rules.edit_mimes:
                raise RowFailure("BadInput", f"{rules.name} edits take {', '.join(rules.edit_mimes)}, "
                                             f"not {img.mime} ({img.ref})")
            if len(img.data) > rules.edit_max_bytes:
                raise RowFailure("BadInput", f"{rules.name} edits take images under {rules.edit_max_bytes} "
                                             f"bytes; {img.ref} has {len(img.data)}")
            if rules.edit_square and img.width != img.height:
                raise RowFailure("BadInput", f"{rules.name} edits take a square image; {img.ref} is "
                                             f"{img.width}x{img.height}")
            files.append((f"image-{k}.{_EXT[img.mime]}", img.data, img.mime))
        return files

    async def call(self, request: Request) -> Response:
        """Generate (text2image) or edit (imageedit) one row's images."""
        prompt = request.prompt
        self._check_prompt(prompt)
        args = self._common()
        if self.edit:
            images = request.images
            files = self._edit_files(images)
            if self.mask is not None:
                _, mw, mh = self.mask
                if (images[0].width, images[0].height) != (mw, mh):
                    raise RowFailure("BadInput", f"the mask is {mw}x{mh} but the image {images[0].ref} is "
                                                 f"{images[0].width}x{images[0].height}")
                args["mask"] = ("mask.png", self.mask[0], "image/png")
            with openai_errors(self.client.base_url.host):
                result = await self.client.images.edit(
                    image=files[0] if len(files) == 1 else files, prompt=prompt, **args)
        else:
            with openai_errors(self.client.base_url.host):
                result = await self.client.images.generate(prompt=prompt, **args)
        return await self._response(result)

    async def _response(self, result) -> Response:
        if isinstance(result, str) or not hasattr(result, "data"):
            raise RetryableError("MalformedResponse", "the response is not an images response")
        if not result.data:
            raise RetryableError("EmptyResponse", "the response has no images")
        images, revised = [], []
        for k, item in enumerate(result.data):
            if item.b64_json:
                images.append(decode_b64(item.b64_json, f"data[{k}].b64_json"))
            elif item.url:
                images.append(await download_image(item.url, timeout=self.options.timeout))
            else:
                raise RetryableError("MalformedResponse", f"data[{k}] has neither b64_json nor url")
            if item.revised_prompt:
                revised.append(item.revised_prompt)
        if len(images) < self.params.n:
            log.info("asked for %d images, got %d", self.params.n, len(images))
        meta = {"revised_prompts": revised} if revised else {}
        meta["usage"] = usage_from_openai_images(getattr(result, "usage", None), len(images)).to_dict()
        return Response(images=images, meta=meta)

    async def aclose(self) -> None:
        """Close the SDK client's connection pool (call it inside the event loop that used it)."""
        await self.client.close()

    def close(self) -> None:
        """Nothing to do outside the event loop: the pool belongs to it (see aclose)."""
