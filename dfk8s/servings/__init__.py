"""Servings registry: each serving described once; its class is imported lazily (no torch for captions).

What a serving is, in one place: the pipelines it runs, where its credentials come from, whether it
needs a GPU, the extra that installs it, how long one request (or row) takes for estimates and shard
sizes, and its defaults. ``dfk8s run``, ``dfk8s submit`` (through the job profiles), the planner and
the executors all read :data:`SERVINGS`, so they resolve the same defaults.
"""

from __future__ import annotations

import importlib
import os
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
        batch_pipelines: Pipelines it runs in ``--api-mode batch`` (its provider's batch API).
        priced: A paid API: its ``model`` has a price in the price table, the run's cost is counted.
        options: The options (flag names) it reads; a flag outside them is refused, never ignored. None:
            any (the echo test serving).
        requires: The modules its extra installs (checked before a run starts, so a missing extra is one
            line, not a traceback in every worker).
        compiles: Its workers torch.compile and share what they compiled through the compile cache
            (dfk8s/servings/flux_speed.py): on a cluster, its pods mount that cache writable.
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
    batch_pipelines: tuple[str, ...] = ()
    priced: bool = False
    options: frozenset[str] | None = None
    requires: tuple[str, ...] = ()
    compiles: bool = False

    @property
    def is_api(self) -> bool:
        """A remote API serving (it needs a key; its pods only wait on the network)."""
        return bool(self.credentials)

    def defaults_for(self, pipeline: str) -> dict[str, Any]:
        """The options this serving uses for ``pipeline`` when no flag sets them."""
        return {**self.defaults, **self.pipeline_defaults.get(pipeline, {})}

    def api_key(self) -> str:
        """This serving's API key, from the first of its :attr:`credentials` variables that is set.

        Raises:
            SpecError: None is set (the message names the variables, never a value).
        """
        return api_key_from_env(self.credentials)

    def concurrency(self, options: dict[str, Any]) -> int:
        """Rows one worker keeps in flight with ``options`` (requests for an API, a batch on a GPU)."""
        merged = {**self.defaults, **{k: v for k, v in options.items() if v is not None}}
        if self.gpu:
            return max(1, int(merged.get("batch_size") or 1))
        return max(1, int(merged.get("max_concurrency") or 1))


OPENAI_KEY_ENV = ("DF_API_KEY", "OPENAI_API_KEY")
#: What every API serving uses when no flag says otherwise: seconds before a request is abandoned and
#: retried (``--timeout``), and retries of a 429/5xx/timeout before the row's error record
#: (``--max-retries``).
API_DEFAULTS = {"timeout": 120.0, "max_retries": 5}
#: What every API serving reads: its endpoint, model, in-flight and rate limits, retries, batch mode.
_API_OPTIONS = frozenset({"model", "api_url", "max_concurrency", "rpm", "timeout", "max_retries", "api_mode",
                          "batch_poll_seconds", "max_image_side"})
#: Options of the run, not of a serving: every serving takes them (those about input images only where
#: the pipeline reads images).
RUN_OPTIONS = frozenset({"prompt"})
IMAGE_INPUT_OPTIONS = frozenset({"image_timeout", "allow_private_image_hosts", "allowed_image_networks",
                                 "image_fetch", "max_image_side"})
GEMINI_KEY_ENV = ("GEMINI_API_KEY", "GOOGLE_API_KEY", "DF_API_KEY")
#: What a self-hosted engine serving reads: the chat options, and how its engine is set up and watched.
_ENGINE_OPTIONS = frozenset({"model", "max_concurrency", "timeout", "max_retries", "system_prompt",
                             "temperature", "max_tokens", "max_model_len", "engine_args", "engine_timeout",
                             "engine_hang_seconds", "max_image_side"})
#: Seconds an engine may take to become ready (weights load, warm-up), and to answer nothing with rows
#: in flight before it counts as hung.
ENGINE_TIMEOUT, ENGINE_HANG_SECONDS = 900.0, 300.0
_ENGINE_DEFAULTS = {**API_DEFAULTS, "max_tokens": 256, "engine_timeout": ENGINE_TIMEOUT,
                    "engine_hang_seconds": ENGINE_HANG_SECONDS}

#: Serving name -> its description.
SERVINGS: dict[str, ServingInfo] = {s.name: s for s in (
    # Runs on a plain install (the lean client); only --client sdk needs the api extra's openai SDK.
    ServingInfo("openai-chat", "dfk8s.servings.openai_chat:OpenAIChatServing", ("caption", "vqa"),
                OPENAI_KEY_ENV, latency=3.0, batch_pipelines=("caption", "vqa"), priced=True,
                options=_API_OPTIONS | {"system_prompt", "temperature", "max_tokens", "client",
                                        "image_fetch"},
                defaults={**API_DEFAULTS, "model": "gpt-4o-mini", "max_concurrency": 64, "client": "fast"}),
    # Image calls are slow and rate-limited (images per minute): 8 in flight is ~24-50 images/min.
    ServingInfo("openai-images", "dfk8s.servings.openai_images:OpenAIImagesServing",
                ("text2image", "imageedit"), OPENAI_KEY_ENV, extra="api", latency=20.0, requires=("openai",),
                batch_pipelines=("text2image",), priced=True,
                options=_API_OPTIONS | {"size", "quality", "response_format", "mask", "images_per_prompt"},
                defaults={**API_DEFAULTS, "model": "gpt-image-1.5", "max_concurrency": 8}),
    ServingInfo("gemini-images", "dfk8s.servings.gemini_images:GeminiImagesServing",
                ("text2image", "imageedit"), GEMINI_KEY_ENV, extra="api", latency=10.0,
                requires=("google.genai",),
                batch_pipelines=("text2image", "imageedit"), priced=True,
                options=_API_OPTIONS | {"system_prompt", "temperature", "aspect_ratio", "image_size",
                                        "images_per_prompt", "client"},
                defaults={**API_DEFAULTS, "model": "gemini-2.5-flash-image", "max_concurrency": 8,
                          "client": "fast"}),
    # ~15 s per 1024px image at 28 steps on one 80 GB GPU.
    ServingInfo("diffusers", "dfk8s.servings.diffusers_flux:DiffusersServing", ("text2image", "imageedit"),
                gpu=True, extra="gpu", latency=15.0, requires=("torch", "diffusers", "transformers"),
                compiles=True,
                options=frozenset({"model", "steps", "guidance", "height", "width", "batch_size",
                                   "images_per_prompt", "dtype", "cpu_offload", "max_area", "auto_resize",
                                   "max_sequence_length", "compile", "step_cache", "fp8"}),
                defaults={"steps": 28, "dtype": "bfloat16", "batch_size": 4},
                pipeline_defaults={
                    "text2image": {"model": "black-forest-labs/FLUX.1-dev", "guidance": 3.5,
                                   "width": 1024, "height": 1024},
                    # Kontext's output size follows the input image (--max-area); guidance 2.5 is BFL's.
                    "imageedit": {"model": "black-forest-labs/FLUX.1-Kontext-dev", "guidance": 2.5}}),
    # A VLM of your own, one engine per worker (dfk8s/servings/self_hosted.py). The engine batches
    # continuously: many rows in flight. 256 tokens is a long caption; the engines' own default runs to
    # the context limit (transformers serve: 1,024 tokens).
    ServingInfo("vllm", "dfk8s.servings.self_hosted:SelfHostedServing", ("caption", "vqa"), gpu=True,
                latency=2.0, options=_ENGINE_OPTIONS | {"gpu_memory_utilization"},
                defaults={**_ENGINE_DEFAULTS, "max_concurrency": 128}),
    ServingInfo("transformers", "dfk8s.servings.self_hosted:SelfHostedServing", ("caption", "vqa"),
                extra="vlm", latency=2.0, requires=("transformers", "fastapi", "uvicorn"),
                options=_ENGINE_OPTIONS, defaults={**_ENGINE_DEFAULTS, "max_concurrency": 16}),
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


def api_key_from_env(names: tuple[str, ...]) -> str:
    """Return the API key from the first set variable of ``names``.

    Raises:
        SpecError: None is set (the message names the variables, never a value).
    """
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    raise SpecError(f"missing API key: set {' or '.join(names)}")


def require_installed(name: str, options: dict[str, Any] | None = None) -> None:
    """Refuse, in one line, a serving whose extra is not installed (it names the pip command).

    Raises:
        SpecError: A module of its extra is missing.
    """
    import importlib.util

    info = serving_info(name)
    needed = [*info.requires]
    if name == "openai-chat" and (options or {}).get("client") == "sdk":
        needed.append("openai")
    for module in needed:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # its parent package is missing
            found = False
        if not found:
            extra = info.extra or "api"
            what = f"serving {name}" + (" --client sdk" if module == "openai" and not info.requires else "")
            raise SpecError(f"{what} needs the '{extra}' extra: pip install 'dfk8s[{extra}]' "
                            f"({module} is missing)")


def require_credentials(name: str) -> None:
    """Fail before anything starts when serving ``name`` needs a key that no variable holds.

    Raises:
        SpecError: Its key is missing (exit 42: every shard would fail the same way).
    """
    info = serving_info(name)
    if info.credentials:
        info.api_key()


def check_flags_take_effect(pipeline, serving: str, options: dict[str, Any]) -> None:
    """Refuse, in one line, an option that ``serving`` running ``pipeline`` would not read.

    Args:
        pipeline: The :class:`dfk8s.pipelines.Pipeline`.
        serving: The serving's name.
        options: The options given (flag names, without the registered defaults).

    Raises:
        UsageError: A flag that cannot take effect (nothing is silently ignored).
    """
    from dfk8s.errors import UsageError

    info = serving_info(serving)
    if info.options is None:
        return
    takes = info.options | RUN_OPTIONS | (IMAGE_INPUT_OPTIONS if pipeline.uses_images else frozenset())
    if not pipeline.uses_images:
        takes -= IMAGE_INPUT_OPTIONS
    for name in sorted(options):
        if options[name] not in (None, False, [], ()) and name not in takes:
            flag = "--" + name.replace("_", "-")
            why = ("reads no input image" if name in IMAGE_INPUT_OPTIONS else f"with serving {serving} "
                   f"(its options: {', '.join('--' + o.replace('_', '-') for o in sorted(info.options))})")
            raise UsageError(f"{flag} has no effect on {pipeline.name}, which {why}" if name in
                             IMAGE_INPUT_OPTIONS else f"{flag} has no effect {why}")


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
           "api_key_from_env", "build_serving", "check_flags_take_effect", "require_credentials",
           "require_installed",
           "serving_class", "serving_defaults", "serving_info"]
