"""The ``diffusers`` serving: FLUX.1-dev for ``text2image``, FLUX.1-Kontext-dev for ``imageedit``.

One pipeline per visible CUDA GPU (``concurrency`` = GPUs, so the worker keeps each busy), loaded once per
worker process on the first :meth:`DiffusersServing.run`, in a thread so the worker's event loop stays
responsive. On a machine without CUDA: one pipeline on the CPU.

Options read from the run spec (``spec.option``):

==================  ==========================================================================================
``model``           Hub name or local folder. Default ``black-forest-labs/FLUX.1-dev`` (text2image) or
                    ``black-forest-labs/FLUX.1-Kontext-dev`` (imageedit). The cache is ``$HF_HOME``, the
                    token ``$HF_TOKEN`` (read by huggingface_hub itself; never logged or stored).
``steps``           Inference steps (28).
``guidance``        Guidance scale (3.5 for FLUX.1-dev, 2.5 for Kontext).
``height/width``    Output size (1024x1024 for text2image). Kontext default: the input image's aspect ratio,
                    scaled to ``max_area`` by the pipeline itself.
``batch_size``      Rows per pipeline call (4).
``images_per_prompt``  Images per row (1).
``dtype``           ``bfloat16`` (default), ``float16`` or ``float32``.
``cpu_offload``     ``enable_model_cpu_offload`` instead of keeping the whole pipeline on the GPU (False).
``max_area``        Kontext: output area in pixels (height x width when both are given, else 1024**2,
                    diffusers' default).
``auto_resize``     Kontext: snap the input to Kontext's preferred resolutions (True, diffusers' default).
                    False scales the input to the output size instead (tiny test pipelines use this).
``max_sequence_length``  T5 prompt tokens (512, FLUX.1-dev's; FLUX.1-schnell takes at most 256).
``compile``         The lossless fast path: fused QKV and regional ``torch.compile`` (default: on with CUDA,
                    off on a CPU). See :mod:`dfk8s.servings.flux_speed`, also for the compile cache.
``step_cache``      Lossy: First Block Cache with this threshold in (0, 1] (default off).
``fp8``             Lossy: fp8 weights and activations (torchao; compute capability 8.9+) (default off).
==================  ==========================================================================================

Determinism: every row draws its noise from its own CPU ``torch.Generator`` seeded with ``request.seed``,
so a row's noise does not depend on its batch, its GPU or the number of GPUs. A re-run with the same batches
gives the same PNG bytes on the same hardware and software; the same row in a batch of another size gets
the same image up to float rounding (matrix kernels sum in a shape-dependent order, on GPUs and CPUs alike),
which can move a few pixels by one level.

Failures: a CUDA out-of-memory batch is retried in halves down to single rows (then ``OutOfMemory``); any
other failure of a batch is retried row by row, so a bad row fails only itself. A model that cannot be
found or loaded raises :class:`~dfk8s.errors.SpecError` (exit 42).
"""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from dfk8s.errors import ServingUnavailable, SpecError
from dfk8s.servings import SERVINGS, flux_speed
from dfk8s.servings.base import Request, Response, RowError, Serving

log = logging.getLogger(__name__)

_REGISTERED = SERVINGS["diffusers"]
#: Per pipeline: (diffusers class name, default model, default guidance), from the servings registry.
MODELS = {
    pipeline: (cls, defaults["model"], defaults["guidance"])
    for pipeline, cls in (("text2image", "FluxPipeline"), ("imageedit", "FluxKontextPipeline"))
    for defaults in (_REGISTERED.defaults_for(pipeline),)
}
DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_STEPS = _REGISTERED.defaults["steps"]
DEFAULT_SIZE = _REGISTERED.defaults_for("text2image")["width"]
DEFAULT_BATCH_SIZE = _REGISTERED.defaults["batch_size"]
DEFAULT_MAX_AREA = 1024 ** 2


@dataclass
class _Item:
    """One row inside a serving call: its request, decoded input image and tries so far."""

    index: int
    request: Request
    image: Any = None  # PIL.Image for imageedit
    attempts: int = 0


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_out_of_memory(exc: BaseException) -> bool:
    """Tell whether ``exc`` is a CUDA (or other accelerator) out-of-memory error."""
    import torch

    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _free_accelerator_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _int_option(spec, name: str, default: int, minimum: int = 1) -> int:
    value = spec.option(name, default)
    try:
        number = int(value)
        if number != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise SpecError(f"diffusers option {name} must be an integer, not {value!r}") from None
    if number < minimum:
        raise SpecError(f"diffusers option {name} must be at least {minimum}, not {number}")
    return number


def _bool_option(spec, name: str, default: bool) -> bool:
    value = spec.option(name, default)
    if isinstance(value, bool):
        return value
    words = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
             "off": False}
    if isinstance(value, str) and value.strip().lower() in words:
        return words[value.strip().lower()]
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise SpecError(f"diffusers option {name} must be true or false, not {value!r}")


def kontext_output_size(width: int, height: int, max_area: int, multiple_of: int) -> tuple[int, int]:
    """Compute the size FluxKontextPipeline generates for ``width x height`` (the pipeline's arithmetic)."""
    aspect = width / height
    out_w = round((max_area * aspect) ** 0.5) // multiple_of * multiple_of
    out_h = round((max_area / aspect) ** 0.5) // multiple_of * multiple_of
    return out_w, out_h


def encode_png(image) -> bytes:
    """PNG bytes of a PIL image, deterministic (no timestamps, fixed zlib settings)."""
    buf = io.BytesIO()
    image.save(buf, "PNG", optimize=False)
    return buf.getvalue()


class DiffusersServing(Serving):
    """FLUX.1-dev / FLUX.1-Kontext-dev through diffusers, one pipeline per GPU."""

    name = "diffusers"

    def __init__(self, *, pipeline: str, model: str | None = None, steps: int = DEFAULT_STEPS,
                 guidance: float | None = None, height: int | None = None, width: int | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, images_per_prompt: int = 1, dtype: str = "bfloat16",
                 cpu_offload: bool = False, max_area: int = DEFAULT_MAX_AREA, auto_resize: bool = True,
                 max_sequence_length: int = 512, devices: list[str] | None = None,
                 compile: bool | None = None, step_cache: float | None = None, fp8: bool = False):
        if pipeline not in MODELS:
            raise SpecError(f"the diffusers serving runs text2image or imageedit, not {pipeline!r}")
        if dtype not in DTYPES:
            raise SpecError(f"diffusers option dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        self.pipeline = pipeline
        self.class_name, default_model, default_guidance = MODELS[pipeline]
        self.kontext = pipeline == "imageedit"
        self.model = str(model or default_model)
        self.steps = steps
        self.guidance = default_guidance if guidance is None else float(guidance)
        if not self.kontext:
            height, width = height or DEFAULT_SIZE, width or DEFAULT_SIZE
        self.height, self.width = height, width
        self.batch_size = batch_size
        self.images_per_prompt = images_per_prompt
        self.dtype_name = dtype
        self.cpu_offload = cpu_offload
        self.max_area = max_area
        self.auto_resize = auto_resize
        self.max_sequence_length = max_sequence_length
        self.devices = devices if devices is not None else _visible_devices()
        self.concurrency = len(self.devices)
        self.speed = flux_speed.Speed(compile=flux_speed.compile_default(compile, self.devices[0]),
                                      step_cache=flux_speed.check_step_cache(step_cache), fp8=bool(fp8))
        if self.speed.fp8 and (problem := flux_speed.fp8_problem(self.devices)):
            raise SpecError(problem)
        self._compiled = flux_speed.Compiled(self.speed)
        self._pipes: list[Any] = []
        self._load_lock = threading.Lock()
        self._load_error: SpecError | None = None
        self._free: asyncio.Queue | None = None
        self._free_loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_spec(cls, spec) -> DiffusersServing:
        """Build the serving from the run spec's options (see the module docstring).

        Raises:
            SpecError: An option has a bad value or type.

        """
        guidance = spec.option("guidance")
        try:
            guidance = None if guidance is None else float(guidance)
        except (TypeError, ValueError):
            raise SpecError(f"diffusers option guidance must be a number, not {guidance!r}") from None
        height = spec.option("height")
        width = spec.option("width")
        if (height is None) != (width is None) and spec.pipeline == "imageedit":
            raise SpecError("diffusers imageedit: give both height and width, or neither (to keep the "
                            "input's aspect)")
        return cls(
            pipeline=spec.pipeline,
            model=spec.option("model"),
            steps=_int_option(spec, "steps", DEFAULT_STEPS),
            guidance=guidance,
            height=None if height is None else _int_option(spec, "height", DEFAULT_SIZE, 16),
            width=None if width is None else _int_option(spec, "width", DEFAULT_SIZE, 16),
            batch_size=_int_option(spec, "batch_size", DEFAULT_BATCH_SIZE),
            images_per_prompt=_int_option(spec, "images_per_prompt", 1),
            dtype=str(spec.option("dtype", "bfloat16")),
            cpu_offload=_bool_option(spec, "cpu_offload", False),
            # Kontext makes max_area pixels whatever height/width say; given both, they mean the area.
            max_area=_int_option(spec, "max_area", int(height) * int(width) if height and width
                                 else DEFAULT_MAX_AREA, 256),
            auto_resize=_bool_option(spec, "auto_resize", True),
            max_sequence_length=_int_option(spec, "max_sequence_length", 512),
            compile=None if spec.option("compile") is None else _bool_option(spec, "compile", False),
            step_cache=spec.option("step_cache"),  # checked by the constructor
            fp8=_bool_option(spec, "fp8", False),
        )

    @classmethod
    def with_pipelines(cls, pipelines: list[Any], *, pipeline: str = "text2image",
                       **options) -> DiffusersServing:
        """Wrap diffusers pipelines that are already built (benchmarks, tests), one per device.

        ``options`` are the constructor's (steps, guidance, height, width, batch_size, ...).
        """
        devices = [str(getattr(p, "_execution_device", None) or getattr(p, "device", "cpu"))
                   for p in pipelines]
        model = options.pop("model", "<in memory>")
        serving = cls(pipeline=pipeline, model=model, devices=devices, **options)
        serving._pipes = [prepare_pipeline(pipe) for pipe in pipelines]
        for pipe, device in zip(serving._pipes, devices, strict=True):
            flux_speed.apply(pipe, serving.speed, device)
        return serving

    # -- loading -------------------------------------------------------------------------------------

    @property
    def pipelines(self) -> list[Any]:
        """The loaded diffusers pipelines, one per device (empty before the first :meth:`load`)."""
        return list(self._pipes)

    def load(self) -> list[Any]:
        """Load one pipeline per device (once; later calls return at once). Blocking: call it in a thread.

        Raises:
            SpecError: The model cannot be found or loaded (retrying will not help).

        """
        with self._load_lock:
            if self._load_error is not None:
                raise self._load_error
            if not self._pipes:
                started = time.monotonic()
                try:
                    pipes = [self._load_one(self.devices[0])]
                    if len(self.devices) > 1:  # the first load fetched the files; the rest read the cache
                        from concurrent.futures import ThreadPoolExecutor

                        with ThreadPoolExecutor(len(self.devices) - 1) as pool:
                            pipes += list(pool.map(self._load_one, self.devices[1:]))
                except SpecError as exc:
                    self._load_error = exc
                    raise
                self._pipes = pipes
                log.info("loaded %s %s (%s) on %s in %.1fs", self.class_name, self.model, self.dtype_name,
                         ", ".join(self.devices), time.monotonic() - started)
            return self._pipes

    def _load_one(self, device: str):
        import diffusers
        import torch

        cls = getattr(diffusers, self.class_name)
        dtype = getattr(torch, self.dtype_name)
        # diffusers renamed torch_dtype to dtype (the old name still works but warns); use what it takes.
        from diffusers.utils import deprecation_utils

        dtype_kw = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
        try:
            pipe = cls.from_pretrained(self.model, **{dtype_kw: dtype})
        except Exception as exc:
            if _retryable_load_error(exc):
                # Not a row's fault: stop the shard with a retryable exit so the executor tries again.
                raise ServingUnavailable(f"cannot load {self.class_name} from {self.model!r} now: "
                                         f"{_one_line(exc)}") from exc
            raise SpecError(f"cannot load {self.class_name} from {self.model!r}: {_one_line(exc)}"
                            + _load_hint(exc)) from None
        if device.startswith("cuda"):
            if self.cpu_offload:
                pipe.enable_model_cpu_offload(gpu_id=torch.device(device).index or 0)
            else:
                pipe.to(device)
        elif self.cpu_offload:
            log.warning("cpu_offload has no effect without a CUDA GPU")
        prepare_pipeline(pipe)
        flux_speed.apply(pipe, self.speed, device)
        return pipe

    @property
    def status_note(self) -> str | None:
        """What the progress shows while the first compiled call compiles or loads (None otherwise)."""
        return self._compiled.note

    def speed_report(self) -> dict:
        """The shard's share of summary.json's ``flux`` block: the settings, and this worker's compile."""
        return self._compiled.report()

    def _shapes(self) -> dict:
        """The shapes a compiled transformer is specialised to (part of the compile cache's key)."""
        size = ({"max_area": self.max_area, "auto_resize": self.auto_resize, "height": self.height,
                 "width": self.width} if self.kontext else {"height": self.height, "width": self.width})
        return {**size, "batch_size": self.batch_size, "images_per_prompt": self.images_per_prompt,
                "max_sequence_length": self.max_sequence_length}

    async def _acquire(self):
        """Take a free pipeline; load them all on first use."""
        if not self._pipes:
            await asyncio.to_thread(self.load)
        loop = asyncio.get_running_loop()
        if self._free is None or self._free_loop is not loop:
            # A queue belongs to one event loop; a new loop (a new asyncio.run) has no call in flight.
            self._free, self._free_loop = asyncio.Queue(), loop
            for pipe in self._pipes:
                self._free.put_nowait(pipe)
        return await self._free.get()

    # -- running -------------------------------------------------------------------------------------

    async def run(self, batch: list[Request]) -> list[Response | RowError]:
        """Generate a batch on a free pipeline (loading them on first use); one result per request.

        Raises:
            SpecError: The model cannot be loaded.

        """
        if not batch:
            return []
        pipe = await self._acquire()
        try:
            return await asyncio.to_thread(self.run_sync, pipe, batch)
        finally:
            if self._free is not None:
                self._free.put_nowait(pipe)

    def run_sync(self, pipe, batch: list[Request]) -> list[Response | RowError]:
        """Run ``batch`` on ``pipe`` (blocking); one result per request, in order, never raising for a row."""
        results: list[Response | RowError | None] = [None] * len(batch)
        items: list[_Item] = []
        for i, request in enumerate(batch):
            item = _Item(i, request)
            if self.kontext:
                problem = self._attach_image(item)
                if problem is not None:
                    results[i] = problem
                    continue
            items.append(item)
        for group in self._groups(items):
            for item, result in zip(group, self._generate_safely(pipe, group), strict=True):
                results[item.index] = result
        return results  # type: ignore[return-value]

    def _attach_image(self, item: _Item) -> RowError | None:
        """Decode a Kontext row's input image; a RowError when it has none, several, or a bad one."""
        images = item.request.images
        if not images:
            return RowError("NoImage", "imageedit needs an input image; the row has none", 0)
        if len(images) > 1:
            # FluxKontextPipeline conditions on exactly one image; silently dropping the others would
            # hand back an edit of something the user did not ask for.
            return RowError("TooManyImages", f"FLUX Kontext edits one image per row; this row has "
                                             f"{len(images)}", 0)
        from PIL import Image

        try:
            with Image.open(io.BytesIO(images[0].data)) as img:
                item.image = img.convert("RGB")
        except Exception as exc:
            return RowError("BadImage", f"input image {images[0].ref} does not decode: {_one_line(exc)}", 0)
        return None

    def _groups(self, items: list[_Item]) -> list[list[_Item]]:
        """Rows that can share one pipeline call, in order.

        Kontext resizes every image of a call to the first one's size and makes one output size per call,
        so only rows whose input images have the same size share a call.
        """
        if not self.kontext:
            return [items] if items else []
        groups: dict[tuple[int, int], list[_Item]] = {}
        for item in items:
            groups.setdefault(item.image.size, []).append(item)
        return list(groups.values())

    def _generate_safely(self, pipe, items: list[_Item]) -> list[Response | RowError]:
        """Generate ``items`` in one call; on failure split (out of memory) or go row by row (else)."""
        for item in items:
            item.attempts += 1
        try:
            images = self._generate(pipe, items)
            return [Response(images=imgs, attempts=item.attempts)
                    for item, imgs in zip(items, images, strict=True)]
        except Exception as exc:
            failure = (is_out_of_memory(exc), type(exc).__name__, _one_line(exc))
            if not failure[0]:
                log.warning("a batch of %d rows failed (%s: %s)%s", len(items), failure[1], failure[2],
                            "; retrying row by row" if len(items) > 1 else "")
        # Outside the except block, so the traceback (and the tensors its frames hold) is already gone.
        oom, exc_type, message = failure
        if oom:
            _free_accelerator_memory()
            if len(items) > 1:
                half = (len(items) + 1) // 2
                log.warning("out of memory on a batch of %d rows; retrying in halves", len(items))
                return self._generate_safely(pipe, items[:half]) + self._generate_safely(pipe, items[half:])
            return [RowError("OutOfMemory", f"out of memory on a single row ({self.width or 'auto'}x"
                                            f"{self.height or 'auto'}, {self.images_per_prompt} images): "
                                            f"{message}", items[0].attempts)]
        if len(items) > 1:
            return [result for item in items for result in self._generate_safely(pipe, [item])]
        return [RowError(exc_type, message, items[0].attempts)]

    def _generate(self, pipe, items: list[_Item]) -> list[list[bytes]]:
        """One pipeline call for ``items``; returns each row's PNGs."""
        import torch

        n = self.images_per_prompt
        # One CPU generator per row, repeated for its n images: the row's noise is the first n draws of its
        # own generator whatever else shares the call (diffusers draws each latent from generator[i]).
        generators = [torch.Generator("cpu").manual_seed(int(item.request.seed)) for item in items]
        kwargs: dict[str, Any] = dict(
            prompt=[item.request.prompt for item in items for _ in range(n)],
            generator=[g for g in generators for _ in range(n)],
            num_images_per_prompt=1,  # expanded above: keeps prompts, images and generators aligned
            num_inference_steps=self.steps, guidance_scale=self.guidance,
            max_sequence_length=self.max_sequence_length, output_type="pil")
        if self.kontext:
            kwargs.update(self._kontext_kwargs(pipe, items))
        else:
            kwargs.update(height=self.height, width=self.width)
        if self.speed.compile:
            device = self.devices[self._pipes.index(pipe)] if pipe in self._pipes else self.devices[0]
            self._compiled.before_first_call(pipe, device, self.dtype_name, self._shapes())
        with torch.inference_mode(), self._cache_context(pipe):
            output = pipe(**kwargs)
        if self.speed.compile:
            self._compiled.after_call()
        images = list(output.images)
        if len(images) != len(items) * n:
            raise RuntimeError(f"the pipeline returned {len(images)} images for {len(items) * n}")
        return [[encode_png(img) for img in images[k * n:(k + 1) * n]] for k in range(len(items))]

    def _cache_context(self, pipe):
        """The step cache's context around a call where the pipeline does not open one itself.

        FluxPipeline names its denoiser calls (``cache_context("cond")``); FluxKontextPipeline does not,
        and First Block Cache fails every call without one ("No cache context is set").
        """
        import contextlib

        if self.speed.step_cache is None or not self.kontext:
            return contextlib.nullcontext()
        return pipe.transformer.cache_context("cond")

    def _kontext_kwargs(self, pipe, items: list[_Item]) -> dict[str, Any]:
        n = self.images_per_prompt
        in_w, in_h = items[0].image.size  # one size per group
        width, height = (self.width, self.height) if self.width and self.height else (in_w, in_h)
        images = [item.image for item in items]
        if not self.auto_resize:
            # Without auto-resize diffusers would feed the image at its own resolution; scale it to the
            # output size instead (what Kontext was trained on: condition and output of the same size).
            multiple_of = pipe.vae_scale_factor * 2
            size = kontext_output_size(width, height, self.max_area, multiple_of)
            if images[0].size != size:
                from PIL import Image

                images = [img.resize(size, Image.Resampling.LANCZOS) for img in images]
        return dict(image=[img for img in images for _ in range(n)], height=height, width=width,
                    max_area=self.max_area, _auto_resize=self.auto_resize)

    def close(self) -> None:
        """Drop the pipelines and return their accelerator memory."""
        self._pipes = []
        self._free = None
        try:
            _free_accelerator_memory()
        except Exception:  # noqa: BLE001 - closing must not fail a finished shard
            pass


def prepare_pipeline(pipe):
    """Our run-time settings on a loaded pipeline (returned): VAE slicing, no progress bars."""
    # Decode one image at a time: a lower memory peak for batches, and the decoded pixels of a row do not
    # depend on what else shares its batch (the transformer's still can, by float rounding).
    vae = getattr(pipe, "vae", None)
    if vae is not None and hasattr(vae, "enable_slicing"):
        vae.enable_slicing()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _visible_devices() -> list[str]:
    """``cuda:0`` ... for each visible CUDA GPU (honours CUDA_VISIBLE_DEVICES), else ``cpu``."""
    try:
        import diffusers  # noqa: F401 - fail here, as a spec error, not on the first batch
        import torch
    except ImportError as exc:
        raise SpecError(f"serving 'diffusers' needs torch and the 'gpu' extra: install torch first, then "
                        f"pip install 'dfk8s[gpu]' ({exc.name} is missing)") from None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(count)] or ["cpu"]


def _retryable_load_error(exc: BaseException) -> bool:
    """Tell whether loading failed for a reason that can pass (network, hub 5xx/429, GPU memory in use)."""
    if is_out_of_memory(exc):
        return True
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ConnectionError, TimeoutError)):
            return True
        module = type(current).__module__
        if module.startswith(("httpx", "httpcore", "requests", "urllib3")) and \
                any(word in type(current).__name__ for word in ("Connect", "Timeout", "Network", "Protocol")):
            return True
        response = getattr(current, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(status, int) and (status >= 500 or status == 429):
            return True
        current = current.__cause__ or current.__context__
    return False


def _load_hint(exc: BaseException) -> str:
    name = type(exc).__name__
    if name == "GatedRepoError" or "gated" in str(exc).lower():
        return " (a gated model: accept its licence on the hub and set HF_TOKEN)"
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return (" (HF_HUB_OFFLINE is set: the model must be a local folder or already in $HF_HOME; fill the "
                "cache once with `dfk8s model pull MODEL --to DIR` or `--pvc NAME`)")
    return ""


__all__ = ["DiffusersServing", "encode_png", "is_out_of_memory", "kontext_output_size", "prepare_pipeline"]
