"""Caption and VQA on your own GPUs: an OpenAI-compatible engine per worker, the rows through openai-chat.

Two engines, one mechanism:

* ``--serving vllm``: vLLM's OpenAI-compatible server, ``vllm serve MODEL ...``. vLLM cannot run on the
  machines this project is built on (no GPU, no CPU wheel); its command line follows vLLM's documented
  CLI (``vllm serve --help``: ``--served-model-name``, ``--tensor-parallel-size``, ``--max-model-len``,
  ``--gpu-memory-utilization``, ``--limit-mm-per-prompt``) and the tests check the arguments.
* ``--serving transformers``: Hugging Face's own server, ``transformers serve MODEL ...`` (the
  ``serving`` extra of transformers). It runs on a CPU too: small VLMs use it, and so do the tests.

Where the engine runs:

* locally (``dfk8s run``), :class:`Engine` starts it as a child process of the worker, on the worker's
  GPUs, in a process group of its own, its log next to the worker's. It dies with the worker
  (``PR_SET_PDEATHSIG``) and is stopped on every exit path (:meth:`SelfHostedServing.close`);
* on Kubernetes (``dfk8s submit``), the engine is a native sidecar of the pod (``DFK8S_ENGINE_URL`` names
  it, :mod:`dfk8s.kube.manifests` builds it): the worker only waits until it is ready.

Then the rows go through :class:`~dfk8s.servings.openai_chat.OpenAIChatServing`'s request path: the lean
client, retries, the circuit breaker, error records, usage and ``--max-tokens``. What is added:

* start-up failures named in one line with the last lines of the engine's log (a missing model or a
  flag the engine refuses: exit 42; anything else: retried);
* an engine that dies mid-shard is restarted once, and the shard goes on (finished rows are kept);
* an engine that never becomes ready fails the worker after ``--engine-timeout`` seconds;
* an engine that hangs (rows in flight, no answer for ``--engine-hang-seconds``) is stopped and the shard
  fails for a retry: the worker never hangs with it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from dfk8s.errors import ServingUnavailable, SpecError
from dfk8s.ports import listen_port
from dfk8s.servings.api import ApiOptions, RetryableError
from dfk8s.servings.base import Request, Response
from dfk8s.servings.openai_chat import OpenAIChatServing

log = logging.getLogger(__name__)

#: Set in the worker container of a pod whose engine is a sidecar: the engine's base URL.
ENGINE_URL_ENV = "DFK8S_ENGINE_URL"
#: Set in the worker container of such a pod: the GPUs its engine sidecar holds (for GPU-seconds).
ENGINE_GPUS_ENV = "DFK8S_ENGINE_GPUS"
#: Where a local worker's engine writes its log (the launcher sets it to the worker logs' folder).
ENGINE_LOG_DIR_ENV = "DFK8S_ENGINE_LOG_DIR"
#: The port a sidecar engine listens on, in the pod (vLLM's own default).
SIDECAR_PORT = 8000
#: Most images one row of a pipeline sends (vLLM reserves memory for them): a caption is of one image,
#: a VQA conversation may show a few.
IMAGES_PER_PROMPT = {"caption": 1, "vqa": 4}
#: Lines of the engine's log quoted when it fails to start.
LOG_TAIL_LINES = 4
_ERROR_LINE = re.compile(r"^([\w.]+(Error|Exception)|error)\b[:\s]", re.IGNORECASE)


@dataclass(frozen=True)
class EngineConfig:
    """How to start an engine: what ``--serving``, ``--model`` and the set-up flags say.

    Attributes:
        engine: ``vllm`` or ``transformers``.
        model: A Hub id or a local folder; the name requests use (``--served-model-name`` for vLLM;
            ``transformers serve`` is pinned to it).
        gpus: GPUs the engine spreads over (vLLM's tensor parallelism); ``None``: one.
        max_model_len: Longest prompt plus answer, in tokens; ``None``: the model's own.
        gpu_memory_utilization: vLLM's share of GPU memory; ``None``: vLLM's default (0.9).
        images_per_prompt: Most images one row sends (the pipeline's); vLLM reserves memory for them.
        engine_args: ``KEY=VALUE`` pairs passed through as ``--KEY VALUE`` (``KEY`` alone: a switch).
    """

    engine: str
    model: str
    gpus: int | None = None
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    images_per_prompt: int = 1
    engine_args: tuple[str, ...] = ()

    def command(self, *, host: str, port: int) -> list[str]:
        """The engine's command line, serving on ``host:port`` (no secret is ever on it)."""
        if self.engine == "vllm":
            import json

            cmd = ["vllm", "serve", self.model, "--host", host, "--port", str(port),
                   "--served-model-name", self.model,
                   "--limit-mm-per-prompt", json.dumps({"image": max(1, self.images_per_prompt)})]
            if self.gpus and self.gpus > 1:
                cmd += ["--tensor-parallel-size", str(self.gpus)]
            if self.gpu_memory_utilization is not None:
                cmd += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        elif self.engine == "transformers":
            # The console script of the transformers package that this Python has.
            cli = Path(sys.executable).with_name("transformers")
            cmd = [str(cli) if cli.exists() else "transformers", "serve", self.model,
                   "--host", host, "--port", str(port)]
        else:
            raise SpecError(f"unknown engine {self.engine!r}; choose vllm or transformers")
        if self.max_model_len is not None:
            cmd += ["--max-model-len", str(self.max_model_len)]
        return cmd + engine_arg_flags(self.engine_args)

    @classmethod
    def from_spec(cls, spec) -> EngineConfig:
        """Read the engine's options from a run spec; its GPUs are the worker's (``CUDA_VISIBLE_DEVICES``)."""
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        return cls(engine=spec.serving, model=str(spec.option("model")), gpus=len(visible) or None,
                   max_model_len=_int_or_none(spec.option("max_model_len")),
                   gpu_memory_utilization=spec.option("gpu_memory_utilization"),
                   images_per_prompt=IMAGES_PER_PROMPT.get(spec.pipeline, 1),
                   engine_args=tuple(spec.option("engine_args") or ()))


def engine_arg_flags(pairs) -> list[str]:
    """``KEY=VALUE`` pairs as command-line flags: ``--KEY VALUE``; a bare ``KEY`` is the switch ``--KEY``.

    Raises:
        SpecError: A key that is empty or has spaces.
    """
    flags = []
    for pair in pairs:
        key, sep, value = str(pair).partition("=")
        key = key.strip().removeprefix("--")
        if not key or any(ch.isspace() for ch in key):
            raise SpecError(f"--engine-arg {pair!r}: expected KEY=VALUE (for example max-num-seqs=64)")
        flags += [f"--{key}", value] if sep else [f"--{key}"]
    return flags


def _int_or_none(value) -> int | None:
    return None if value in (None, "") else int(value)


def _set_parent_death_signal() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The log's last lines in one line; an exception's own line first (a traceback's tail is noise)."""
    try:
        with open(path, errors="replace") as f:
            last = [line.strip()[:300] for line in deque(f, 200) if line.strip()]
    except OSError:
        return ""
    errors = [line for line in last if _ERROR_LINE.match(line)]
    shown = last[-lines:]
    if errors:
        shown = [errors[-1], *(line for line in shown if line != errors[-1])]
    return " | ".join(shown)


def _healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class Engine:
    """One engine child process of a worker: started, waited for, restarted, stopped.

    Args:
        config: What to start.
        log_dir: Where its log goes (``engine-<pid of the worker>.log``).
        ready_timeout: Seconds it may take to become ready (weights load, warm-up).
    """

    def __init__(self, config: EngineConfig, *, log_dir: Path, ready_timeout: float):
        self.config = config
        self.log_path = Path(log_dir) / f"engine-{os.getpid()}.log"
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.started_in = 0.0  # seconds the last start took, until ready
        self.starts = 0

    @property
    def url(self) -> str:
        """The engine's OpenAI-compatible base URL."""
        return f"http://127.0.0.1:{self.port}/v1"

    def alive(self) -> bool:
        """Whether the engine process still runs."""
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the engine and wait until it is ready.

        Raises:
            SpecError: It exited at once on a usage error (a bad ``--engine-arg``) or a model it cannot
                find: every shard would fail the same way (exit 42).
            ServingUnavailable: It failed otherwise, or was not ready in time (the shard is retried).
        """
        model = self.config.model
        if model.startswith(("/", "./", "../", "~")) and not Path(model).expanduser().exists():
            raise SpecError(f"serving {self.config.engine}: --model {model} does not exist (a local model "
                            "folder, or a Hub id such as Qwen/Qwen2.5-VL-3B-Instruct)")
        self.port = listen_port()  # stays free while the model loads
        command = self.config.command(host="127.0.0.1", port=self.port)
        env = dict(os.environ)
        if Path(self.config.model).is_dir():
            env.setdefault("HF_HUB_OFFLINE", "1")  # a folder at hand: never ask the Hub
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        log.info("starting %s engine for %s (log %s): %s", self.config.engine, self.config.model,
                 self.log_path, shlex.join(command))
        try:
            with open(self.log_path, "ab") as log_file:
                self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file,
                                                stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                                preexec_fn=_set_parent_death_signal)
        except FileNotFoundError:
            raise SpecError(f"serving {self.config.engine}: {command[0]!r} is not installed here "
                            f"({_install_hint(self.config.engine)})") from None
        self.starts += 1
        deadline = began + self.ready_timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                self._failed_to_start(code)
            if _healthy(self.url):
                self.started_in = time.monotonic() - began
                log.info("%s engine ready in %.1fs on port %d", self.config.engine, self.started_in,
                         self.port)
                return
            time.sleep(0.25)
        self.stop()
        raise ServingUnavailable(f"the {self.config.engine} engine was not ready after "
                                 f"{self.ready_timeout:.0f}s (--engine-timeout); last log lines: "
                                 f"{_tail(self.log_path)}")

    def _failed_to_start(self, code: int) -> None:
        tail = _tail(self.log_path)
        try:
            lowered = self.log_path.read_text(errors="replace")[-20_000:].lower()
        except OSError:
            lowered = tail.lower()
        message = f"the {self.config.engine} engine exited ({code}) while starting; last log lines: {tail}"
        usage = code == 2 or "no such option" in lowered or "unrecognized arguments" in lowered
        # Every attempt would fail the same way: no such model, or a folder that holds none.
        missing = any(marker in lowered for marker in (
            "not a valid model identifier", "repository not found", "does not appear to have",
            "unrecognized model in", "no such file or directory", "cannot find the requested files"))
        if usage or missing:
            raise SpecError(message)
        raise ServingUnavailable(message)

    def stop(self, grace: float = 10.0) -> None:
        """Stop the engine and its children: SIGTERM to its process group, SIGKILL after ``grace``."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            process.wait()


def _install_hint(engine: str) -> str:
    return ("pip install 'transformers[serving]', or use the dfk8s image" if engine == "transformers"
            else "pip install vllm on a GPU machine, or use dfk8s submit: its pods run vLLM's official "
                 "image")


def wait_for_sidecar(url: str, timeout: float) -> float:
    """Wait until the sidecar engine at ``url`` answers its health check; returns the seconds waited.

    Raises:
        ServingUnavailable: Not ready within ``timeout`` seconds.
    """
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if _healthy(url):
            return time.monotonic() - began
        time.sleep(0.5)
    raise ServingUnavailable(f"the engine sidecar at {url} was not ready after {timeout:.0f}s "
                             "(--engine-timeout)")


class SelfHostedServing(OpenAIChatServing):
    """openai-chat against an engine of this worker's own (a child process, or the pod's sidecar)."""

    name = "self-hosted"

    def __init__(self, options: ApiOptions, engine: Engine | None, *, hang_seconds: float,
                 temperature: float | None = None, max_tokens: int | None = None, engine_name: str = "",
                 gpus: int = 0, startup_seconds: float = 0.0):
        super().__init__(options, temperature=temperature, max_tokens=max_tokens, client="fast", api_key="")
        self.engine = engine
        self.engine_name, self.gpus, self._startup = engine_name, gpus, startup_seconds
        self.hang_seconds = hang_seconds
        self.restarts = 0
        self._in_flight = 0
        self._last_answer = time.monotonic()
        self._restart_lock: asyncio.Lock | None = None
        self._watchdog: asyncio.Task | None = None
        self._hung: str | None = None

    @classmethod
    def from_spec(cls, spec) -> SelfHostedServing:
        """Start (or wait for) the engine, then build the chat serving on its URL."""
        timeout = float(spec.option("engine_timeout"))
        sidecar = os.environ.get(ENGINE_URL_ENV)
        engine = None
        config = EngineConfig.from_spec(spec)
        if sidecar:
            startup = wait_for_sidecar(sidecar, timeout)
            log.info("engine sidecar %s ready after %.1fs", sidecar, startup)
            url = sidecar
            gpus = int(os.environ.get(ENGINE_GPUS_ENV) or 0)
        else:
            log_dir = Path(os.environ.get(ENGINE_LOG_DIR_ENV) or tempfile.gettempdir())
            engine = Engine(config, log_dir=log_dir, ready_timeout=timeout)
            engine.start()
            url, startup, gpus = engine.url, engine.started_in, config.gpus or 0
        options = ApiOptions.from_spec(spec)
        options = ApiOptions(api_url=url, model=str(spec.option("model")),
                             max_concurrency=options.max_concurrency, timeout=options.timeout,
                             max_retries=options.max_retries, rpm=options.rpm)
        return cls(options, engine, hang_seconds=float(spec.option("engine_hang_seconds")),
                   temperature=spec.option("temperature"), max_tokens=spec.option("max_tokens"),
                   engine_name=spec.serving, gpus=gpus, startup_seconds=startup)

    def engine_report(self) -> dict:
        """For the shard's done marker: the engine, its GPUs, and its start-up time (the first shard only).

        A sidecar's start-up is the time the worker waited for it (the pod started both together).
        """
        startup, self._startup = self._startup, 0.0
        return {"engine": self.engine_name, "gpus": self.gpus, "startup_seconds": round(startup, 3)}

    async def call(self, request: Request) -> Response:
        """One row through openai-chat's path; a dead engine is restarted once, a hung one stopped.

        Raises:
            ServingUnavailable: The engine hung, or died again: the shard stops for a retry (its
                finished rows are kept).
        """
        self._ensure_watchdog()
        if self._hung is not None:
            if self.engine is None:
                raise ServingUnavailable(self._hung)
            await self._restart(after_hang=True)  # a new shard after a hang: a fresh engine
        if self._restart_lock is not None and self._restart_lock.locked():
            async with self._restart_lock:  # a restart is under way: send to the new engine once ready
                pass
        if not self._in_flight:
            self._last_answer = time.monotonic()  # the clock runs only while rows are in flight
        self._in_flight += 1
        try:
            response = await super().call(request)
            self._last_answer = time.monotonic()
            return response
        except RetryableError as exc:
            if self._hung is not None:
                raise ServingUnavailable(self._hung) from None
            if self.engine is None or (self.engine.alive() and not self._restart_lock_held()):
                raise
            await self._restart()
            # Not the engine's answer to this row: retried as a blip, never counted as a wrong endpoint.
            raise RetryableError("EngineRestarted", f"the engine restarted after: {exc}") from None
        finally:
            self._in_flight -= 1

    def _restart_lock_held(self) -> bool:
        return self._restart_lock is not None and self._restart_lock.locked()

    async def _restart(self, *, after_hang: bool = False) -> None:
        if self._restart_lock is None:
            self._restart_lock = asyncio.Lock()
        async with self._restart_lock:
            if self.engine.alive() and self._hung is None:
                return  # another row restarted it meanwhile
            name = self.engine.config.engine
            if after_hang:
                log.warning("restarting the %s engine after it hung", name)
            else:
                code = self.engine.process.returncode if self.engine.process else None
                if self.restarts >= 1:
                    raise ServingUnavailable(f"the {name} engine died again ({code}); last log lines: "
                                             f"{_tail(self.engine.log_path)}")
                self.restarts += 1
                log.warning("the %s engine died (%s) mid-shard: restarting it once", name, code)
            self.engine.stop()
            await asyncio.to_thread(self.engine.start)
            await self.clients.aclose()
            self.rebind(self.engine.url)
            self._hung = None
            self._last_answer = time.monotonic()

    def _ensure_watchdog(self) -> None:
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        """Stop a hung engine: rows in flight and no answer for ``hang_seconds``."""
        while self._hung is None:
            await asyncio.sleep(min(1.0, self.hang_seconds / 4))
            if self._in_flight and time.monotonic() - self._last_answer > self.hang_seconds:
                self._hung = (f"the engine answered nothing for {self.hang_seconds:.0f}s with "
                              f"{self._in_flight} rows in flight (--engine-hang-seconds): stopped it; "
                              "the shard is retried")
                log.error("%s", self._hung)
                if self.engine is not None:  # the rows in flight fail at once, and see _hung
                    await asyncio.to_thread(self.engine.stop, 2.0)

    async def aclose(self) -> None:
        """Close the HTTP client and the watchdog."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        await super().aclose()

    def close(self) -> None:
        """Stop the engine (every exit path of the worker comes here, or kills it with the worker)."""
        if self.engine is not None:
            self.engine.stop()
