"""An instant serving that echoes the prompt: for dry pipelines, worker benchmarks and tests."""

from __future__ import annotations

import io

from dfk8s.servings import SERVINGS
from dfk8s.servings.base import Request, Response, RowError, Serving


class EchoServing(Serving):
    """Answers every request at once: text for text pipelines, a tiny PNG for image pipelines.

    Options: ``images_per_prompt`` (images per row for image pipelines, default 1), ``fail_marker`` (rows
    whose prompt contains it fail with an error record), ``max_concurrency``.
    """

    name = "echo"

    def __init__(self, images: int = 0, fail_marker: str | None = None, concurrency: int | None = None):
        self.images = images
        self.fail_marker = fail_marker
        self.concurrency = concurrency or SERVINGS[self.name].defaults["max_concurrency"]
        self._png = _tiny_png() if images else b""

    @classmethod
    def from_spec(cls, spec) -> EchoServing:
        """Build from the spec's options; text pipelines get text, image pipelines images."""
        from dfk8s.pipelines import PIPELINES

        produces_images = PIPELINES[spec.pipeline].output_kind == "images"
        return cls(images=spec.option("images_per_prompt", 1) if produces_images else 0,
                   fail_marker=spec.option("fail_marker"), concurrency=spec.option("max_concurrency"))

    async def run(self, batch: list[Request]) -> list[Response | RowError]:
        """Answer each request at once: an error if its prompt has the fail marker, else text or PNGs."""
        out: list[Response | RowError] = []
        for req in batch:
            if self.fail_marker and self.fail_marker in req.prompt:
                out.append(RowError("EchoFailure", f"prompt contains {self.fail_marker!r}"))
            elif self.images:
                out.append(Response(images=[self._png] * self.images))
            else:
                out.append(Response(text=f"echo: {req.prompt}"))
        return out


def _tiny_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 80, 40)).save(buf, "PNG")
    return buf.getvalue()
