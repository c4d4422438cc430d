"""FLUX at the speed the hardware allows: the lossless fast path, the lossy opt-ins, the compile cache.

The **fast path** is lossless and on by default with CUDA (``--compile``/``--no-compile`` override it):

- the transformer's Q, K and V projections fused into one matmul (``fuse_qkv_projections``);
- regional compilation: ``torch.compile`` of the transformer's repeated blocks only (diffusers'
  ``compile_repeated_blocks``), which compiles each distinct block once, so a cold start takes seconds
  rather than the minutes of compiling the whole model;
- on CUDA, the inductor settings of diffusers' speed guide (coordinate-descent tuning, 1x1 convolutions
  as matmuls, no epilogue fusion). They pick kernels; they do not change the arithmetic.

A row gives the same image as on the eager path, up to float rounding (tests/test_flux_speed.py checks it).

The **lossy** speed-ups are opt-in, named, and recorded in run.json and the summary's ``flux`` block:

- ``step_cache``: diffusers' First Block Cache with a threshold in (0, 1]: a step whose first block's
  output barely moved reuses the rest of the network's last residual;
- ``fp8``: torchao's fp8 dynamic-activation, fp8-weight quantization of the transformer; it needs CUDA
  compute capability 8.9 or newer (Ada, Hopper, Blackwell). Elsewhere it is refused in one line.

**Compile once per cluster**: :class:`CompileCache` keeps torch's portable compile artifacts (the
"mega-cache", ``torch.compiler.save_cache_artifacts``) in a folder, ``$DFK8S_COMPILE_CACHE``, by default
``~/.cache/dfk8s/compile`` (``dfk8s run``) or a writable folder on the model-cache claim (``dfk8s submit
--model-cache-pvc``). One file per key; the key holds the GPU model, the torch, CUDA, diffusers and dfk8s
versions, the pipeline class and transformer config, the dtype, the speed settings and the shapes. The
first worker with a key compiles, then publishes the file atomically (written beside its final name,
fsynced, renamed over it); the file's header carries its key and the SHA-256 of its body, so a torn, a
corrupt, another key's or a half-written (``.partial``) file is never loaded: the worker compiles instead.
A worker that loaded the file starts without recompiling its graphs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dfk8s.errors import SpecError

log = logging.getLogger(__name__)

#: Where compiled artifacts are kept and found (a folder); unset: ``DEFAULT_CACHE``.
CACHE_ENV = "DFK8S_COMPILE_CACHE"
DEFAULT_CACHE = Path("~/.cache/dfk8s/compile")
#: Graphs dynamo keeps per code object: Kontext meets up to 17 preferred resolutions, batches a short last
#: one; the default (8) would fall back to eager halfway through a varied shard.
RECOMPILE_LIMIT = 32
#: Published figures (README): a first regional compile of FLUX takes about a minute on an H100.
COMPILE_MINUTES = 1
_FORMAT = 1


@dataclass(frozen=True)
class Speed:
    """The speed settings of one FLUX serving."""

    compile: bool = False
    step_cache: float | None = None
    fp8: bool = False

    @property
    def exact(self) -> bool:
        """True when the images are those of the eager path, up to float rounding."""
        return self.step_cache is None and not self.fp8

    def lossy(self) -> list[str]:
        """The lossy options in force, as the report names them."""
        return ([f"step cache {self.step_cache:g}"] if self.step_cache is not None else []) + \
            (["fp8"] if self.fp8 else [])

    def describe(self) -> dict:
        """The settings as summary.json's ``flux`` block starts them."""
        return {"compile": self.compile, "step_cache": self.step_cache, "fp8": self.fp8, "exact": self.exact}


def compile_default(option: bool | None, device: str) -> bool:
    """``--compile``/``--no-compile`` when given; else on with CUDA, off on a CPU (it costs more there)."""
    return bool(option) if option is not None else device.startswith("cuda")


def check_step_cache(value: Any) -> float | None:
    """The step-cache threshold as a float in (0, 1], or None for off.

    Raises:
        SpecError: Not a number in (0, 1].

    """
    if value is None or value is False:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SpecError(f"diffusers option step_cache must be a number in (0, 1], not {value!r}") from None
    if not 0 < number <= 1:
        raise SpecError(f"diffusers option step_cache must be in (0, 1] (0.35 is a common choice), "
                        f"not {number:g}")
    return number


def fp8_problem(devices: list[str]) -> str | None:
    """Why fp8 cannot run on ``devices`` (one line), or None when it can."""
    gpus = [d for d in devices if d.startswith("cuda")]
    if not gpus:
        return "--fp8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell); this " \
               "worker has none"
    import torch

    for device in gpus:
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return (f"--fp8 needs compute capability 8.9 or newer; {torch.cuda.get_device_name(device)} is "
                    f"{major}.{minor} (run without --fp8)")
    try:
        import torchao  # noqa: F401
    except ImportError:
        return "--fp8 needs torchao: pip install 'dfk8s[fp8]'"
    return None


def apply(pipe, speed: Speed, device: str) -> None:
    """Put ``speed`` on a loaded pipeline, in the order that works: fuse, quantize, cache, compile."""
    transformer = pipe.transformer
    if speed.compile or speed.fp8:
        fuse = getattr(transformer, "fuse_qkv_projections", None)
        if fuse is not None:
            fuse()
    if speed.fp8:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    if speed.step_cache is not None:
        from diffusers import FirstBlockCacheConfig

        transformer.enable_cache(FirstBlockCacheConfig(threshold=speed.step_cache))
    if speed.compile:
        import torch

        _compile_settings(device)
        # Hooks (the step cache) break a graph at their edges: a full graph is asked only without them.
        fullgraph = speed.step_cache is None
        if hasattr(transformer, "compile_repeated_blocks") and getattr(transformer, "_repeated_blocks", None):
            transformer.compile_repeated_blocks(fullgraph=fullgraph)
        else:  # an older diffusers: the whole transformer
            pipe.transformer = torch.compile(transformer, fullgraph=fullgraph)


def _compile_settings(device: str) -> None:
    import torch

    dynamo = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the newer name first
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(getattr(dynamo, name), RECOMPILE_LIMIT))
            break
    if device.startswith("cuda"):
        inductor = torch._inductor.config
        inductor.conv_1x1_as_mm = True
        inductor.coordinate_descent_tuning = True
        inductor.coordinate_descent_check_all_directions = True
        inductor.epilogue_fusion = False


def compile_counts() -> tuple[int, int]:
    """Inductor graphs compiled and loaded from its cache in this process so far: ``(compiled, loaded)``."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fxgraph_cache_miss"]), int(counters["inductor"]["fxgraph_cache_hit"])


def device_name(device: str) -> str:
    """The GPU model (compiled kernels do not move between GPU models), or the CPU's architecture."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}"


def cache_key(*, pipe, device: str, dtype: str, speed: Speed, shapes: dict) -> dict:
    """What a compiled FLUX depends on; two workers with equal keys can share compiled artifacts."""
    import diffusers
    import torch

    import dfk8s

    config = dict(getattr(pipe.transformer, "config", {}) or {})
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"format": _FORMAT, "device": device_name(device), "torch": torch.__version__,
            "cuda": torch.version.cuda, "diffusers": diffusers.__version__, "dfk8s": dfk8s.__version__,
            "pipeline": type(pipe).__name__, "transformer": config_hash, "dtype": dtype,
            "speed": speed.describe(), "shapes": shapes}


def cache_folder() -> Path:
    """``$DFK8S_COMPILE_CACHE``, or ``~/.cache/dfk8s/compile``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


class CompileCache:
    """One key's compiled artifacts in a shared folder: read whole and verified, or not at all."""

    def __init__(self, folder: Path, key: dict):
        self.folder = Path(folder)
        self.key = key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        self.path = self.folder / f"flux-{digest}.torchcache"

    def read(self) -> bytes | None:
        """The artifacts of this key, or None: missing, torn, corrupt or another key's (each logged)."""
        try:
            with open(self.path, "rb") as file:
                header = json.loads(file.readline())
                body = file.read()
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("compile cache %s unreadable, compiling instead: %s", self.path, exc)
            return None
        if not isinstance(header, dict) or header.get("key") != self.key:
            log.warning("compile cache %s holds another key, compiling instead", self.path)
            return None
        if len(body) != header.get("bytes") or hashlib.sha256(body).hexdigest() != header.get("sha256"):
            log.warning("compile cache %s is torn or corrupt, compiling instead", self.path)
            return None
        return body

    def publish(self, body: bytes) -> bool:
        """Write the artifacts atomically (a whole file appears under the final name, or nothing does).

        A folder that cannot be written costs the next worker a compile, never this shard: it warns.
        """
        header = {"key": self.key, "bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        partial = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, partial = tempfile.mkstemp(dir=self.folder, prefix=self.path.name + ".", suffix=".partial")
            with os.fdopen(fd, "wb") as file:
                file.write(json.dumps(header, sort_keys=True).encode() + b"\n")
                file.write(body)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(partial, 0o644)
            os.replace(partial, self.path)
            partial = None
            _fsync_folder(self.folder)
        except OSError as exc:
            log.warning("cannot publish the compiled FLUX to %s (the next worker compiles again): %s",
                        self.folder, exc)
            return False
        finally:
            if partial is not None:
                with contextlib.suppress(OSError):
                    os.unlink(partial)
        return True


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Compiled:
    """A worker process's compile state for one serving: load before the first call, publish after it.

    ``note`` is what the progress shows while the first call compiles or loads; ``report()`` is the
    shard's share of summary.json's ``flux`` block.
    """

    def __init__(self, speed: Speed):
        self.speed = speed
        self.cache: CompileCache | None = None
        self.source = "off" if not speed.compile else "pending"  # then "cache" or "compiled"
        self.note: str | None = None
        self.compile_seconds = 0.0
        self._counts = (0, 0)
        self._published_graphs = 0
        self._lock = threading.Lock()
        self._reported = False
        self._started = time.monotonic()

    def before_first_call(self, pipe, device: str, dtype: str, shapes: dict) -> None:
        """Find this key's artifacts and hot-load them into torch's caches (once per process)."""
        with self._lock:
            if self.source != "pending":
                return
            self.cache = CompileCache(cache_folder(), cache_key(pipe=pipe, device=device, dtype=dtype,
                                                                 speed=self.speed, shapes=shapes))
            body = self.cache.read()
            if body is not None:
                import torch

                try:
                    torch.compiler.load_cache_artifacts(body)
                    self.source = "cache"
                except Exception as exc:  # noqa: BLE001 - a bad cache costs a compile, not the shard
                    log.warning("compile cache %s did not load, compiling instead: %s", self.cache.path, exc)
            if self.source == "pending":
                self.source = "compiled"
                self.note = (f"compiling FLUX (first worker on {device_name(device)} with these shapes; "
                             f"about {COMPILE_MINUTES} min)")
            else:
                self.note = "loading the compiled FLUX from the compile cache"
            log.info("%s: %s", self.cache.path, self.note)
            self._counts = compile_counts()
            self._started = time.monotonic()

    def after_call(self) -> None:
        """After a compiled call: count the graphs; a worker that compiled publishes what it compiled."""
        with self._lock:
            if self.note is not None:
                self.compile_seconds = round(time.monotonic() - self._started, 3)
                self.note = None
            compiled, loaded = compile_counts()
            # Graphs this worker compiled, or found in this machine's own inductor cache (a local rerun).
            graphs = compiled - self._counts[0] + loaded - self._counts[1]
            # Only a worker that found no file publishes: what it saves is all its graphs, while a worker
            # that loaded one would save only the few it added (a short last batch) over the whole file.
            if self.source != "compiled" or graphs <= self._published_graphs or self.cache is None:
                return
            import torch

            saved = torch.compiler.save_cache_artifacts()
            if saved is None:
                return
            if self.cache.publish(saved[0]):
                log.info("published the compiled FLUX (%d graphs, %.1f MB) to %s", graphs,
                         len(saved[0]) / 1e6, self.cache.path)
            self._published_graphs = graphs

    def report(self) -> dict:
        """The shard's share of summary.json's ``flux`` block (the worker's compile counted once)."""
        with self._lock:
            out = self.speed.describe()
            if not self._reported and self.source in ("cache", "compiled"):
                compiled, loaded = compile_counts()
                out.update(worker=self.source, graphs_compiled=compiled - self._counts[0],
                           graphs_loaded=loaded - self._counts[1], compile_seconds=self.compile_seconds)
                self._reported = True
            return out


__all__ = ["CACHE_ENV", "Compiled", "CompileCache", "Speed", "apply", "cache_folder", "cache_key",
           "check_step_cache", "compile_counts", "compile_default", "fp8_problem"]
