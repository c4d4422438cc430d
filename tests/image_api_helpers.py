"""Helpers shared by the image API serving tests (openai-images and gemini-images)."""

from __future__ import annotations

import asyncio
import io

from PIL import Image

from dfk8s.servings import build_serving


def run(spec_, *requests, no_wait=True, answered=False):
    """Build the serving a spec names and run ``requests`` concurrently; close it in the same loop.

    ``answered``: the serving has had an answer already (its circuit breaker is disarmed).
    """

    async def go():
        serving = build_serving(spec_)
        if answered:
            serving.breaker.success()
        if no_wait:
            serving.wait = lambda state: 0.0  # keep backoff out of the tests; Retry-After tests keep it
        try:
            return await asyncio.gather(*(serving.run_one(r) for r in requests))
        finally:
            await serving.aclose()

    return asyncio.run(go())


def decodes(data: bytes) -> Image.Image:
    """Decode image bytes fully (a truncated PNG fails here, not later)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img
