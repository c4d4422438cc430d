"""Servings registry: each serving described once; its class is imported lazily (no torch for captions).

What a serving is, in one place: the pipelines it runs, where its credentials come from, whether it
needs a GPU, the extra that installs it, how long one request (or row) takes for estimates and shard
sizes, and its defaults. ``dfk8s run``, ``dfk8s submit`` (through the job profiles), the planner and
the executors all read :data:`SERVINGS`, so they resolve the same defaults.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from dfk8s.errors import SpecError
from dfk8s.servings.base import ImageInput, Message, Request, Response, RowError, Serving


@dataclass(frozen=True)
class ServingInfo:
    """The description of one serving.

    Attributes:
        name: Registry name (``--serving``).
        target: ``module:Class`` of the implementation, imported on first use.
        pipelines: Pipelines it can run.
        credentials: Environment variables its key is read from, in order (empty: needs none).
        gpu: Whether a worker needs a GPU.
        extra: The package extra that installs its dependencies (``api``, ``gpu``; empty: none).
        latency: Seconds one request takes (a row for a GPU serving), for time estimates and shard
            sizes; typical hosted endpoints, a short caption or one 1024px image. Real latency varies.
        defaults: Serving options used when no flag sets them (keys are the flag names).
        pipeline_defaults: Per pipeline, options over ``defaults``.
    """

    name: str
    target: str
    pipelines: tuple[str, ...]
    credentials: tuple[str, ...] = ()
    gpu: bool = False
    extra: str = ""
    latency: float = 1.0
    defaults: dict[str, Any] = field(default_factory=dict)
    pipeline_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def is_api(self) -> bool:
        """A remote API serving (it needs a key; its pods only wait on the network)."""
        return bool(self.credentials)

    def defaults_for(self, pipeline: str) -> dict[str, Any]:
        """The options this serving uses for ``pipeline`` when no flag sets them."""
        return {**self.defaults, **self.pipeline_defaults.get(pipeline, {})}

    def concurrency(self, options: dict[str, Any]) -> int:
        """Rows one worker keeps in flight with ``options`` (requests for an API, a batch on a GPU)."""
        merged = {**self.defaults, **{k: v for k, v in options.items() if v is not None}}
        if self.gpu:
            return max(1, int(merged.get("batch_size") or 1))
        return max(1, int(merged.get("max_concurrency") or 1))


OPENAI_KEY_ENV = ("DF_API_KEY", "OPENAI_API_KEY")
GEMINI_KEY_ENV = ("GEMINI_API_KEY", "GOOGLE_API_KEY", "DF_API_KEY")

#: Serving name -> its description.
SERVINGS: dict[str, ServingInfo] = {s.name: s for s in (
    ServingInfo("openai-chat", "dfk8s.servings.openai_chat:OpenAIChatServing", ("caption", "vqa"),
                OPENAI_KEY_ENV, extra="api", latency=3.0,
                defaults={"model": "gpt-4o-mini", "max_concurrency": 64, "client": "fast"}),
    # Image calls are slow and rate-limited (images per minute): 8 in flight is ~24-50 images/min.
    ServingInfo("openai-images", "dfk8s.servings.openai_images:OpenAIImagesServing",
                ("text2image", "imageedit"), OPENAI_KEY_ENV, extra="api", latency=20.0,
                defaults={"model": "gpt-image-1.5", "max_concurrency": 8}),
    ServingInfo("gemini-images", "dfk8s.servings.gemini_images:GeminiImagesServing",
                ("text2image", "imageedit"), GEMINI_KEY_ENV, extra="api", latency=10.0,
                defaults={"model": "gemini-2.5-flash-image", "max_concurrency": 8, "client": "fast"}),
    # ~15 s per 1024px image at 28 steps on one 80 GB GPU.
    ServingInfo("diffusers", "dfk8s.servings.diffusers_flux:DiffusersServing", ("text2image", "imageedit"),
                gpu=True, extra="gpu", latency=15.0,
                defaults={"steps": 28, "dtype": "bfloat16", "batch_size": 4},
                pipeline_defaults={
                    "text2image": {"model": "black-forest-labs/FLUX.1-dev", "guidance": 3.5,
                                   "width": 1024, "height": 1024},
                    # Kontext's output size follows the input image (--max-area); guidance 2.5 is BFL's.
                    "imageedit": {"model": "black-forest-labs/FLUX.1-Kontext-dev", "guidance": 2.5}}),
    ServingInfo("echo", "dfk8s.servings.echo:EchoServing", ("caption", "vqa", "text2image", "imageedit"),
                latency=0.001, defaults={"max_concurrency": 64}),
)}


def serving_info(name: str) -> ServingInfo:
    """The description of serving ``name``.

    Raises:
        SpecError: Unknown serving.
    """
    try:
        return SERVINGS[name]
    except KeyError:
        raise SpecError(f"unknown serving {name!r}; choose one of {', '.join(sorted(SERVINGS))}") from None


def serving_defaults(name: str, pipeline: str) -> dict[str, Any]:
    """The options serving ``name`` uses for ``pipeline`` when no flag sets them (a fresh dict)."""
    return dict(serving_info(name).defaults_for(pipeline))


def serving_class(name: str) -> type[Serving]:
    """Return the serving class registered under ``name``.

    Raises:
        SpecError: Unknown serving, or its extra is not installed.
    """
    info = serving_info(name)
    module_name, _, cls_name = info.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(f"serving {name!r} needs the '{info.extra}' extra: pip install 'dfk8s[{info.extra}]' "
                        f"({exc.name} is missing)") from None
    return getattr(module, cls_name)


def build_serving(spec) -> Serving:
    """Build the serving a run spec names."""
    return serving_class(spec.serving).from_spec(spec)


__all__ = ["SERVINGS", "ImageInput", "Message", "Request", "Response", "RowError", "Serving", "ServingInfo",
           "build_serving", "serving_class", "serving_defaults", "serving_info"]
