"""The local executor: worker processes on this machine, retried like ``backoffLimitPerIndex``."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from dfk8s import layout
from dfk8s.errors import EXIT_DO_NOT_RETRY, Dfk8sError
from dfk8s.progress import ProgressReader, progress_bar
from dfk8s.reducer import Summary, reduce_run
from dfk8s.spec import RunSpec

log = logging.getLogger(__name__)


class Interrupted(Dfk8sError):
    """The user stopped the run (Ctrl-C); it can be resumed with the same run id."""

    exit_code = 130

    def __init__(self, run_id: str):
        self.run_id = run_id
        super().__init__(f"interrupted; resume with --run-id {run_id}")


@dataclass
class _Slot:
    index: int
    attempt: int
    process: subprocess.Popen
    log_path: Path
    gpus: str | None = None


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use (``CUDA_VISIBLE_DEVICES``, else what torch counts)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch
    except ImportError:
        return []
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def split_gpus(gpus: list[str], workers: int) -> list[str]:
    """Give each local worker its own GPUs, so two workers never load a model onto the same card."""
    workers = max(1, min(workers, len(gpus)))
    return [",".join(gpus[k::workers]) for k in range(workers)]


@dataclass
class LocalExecutor:
    """Runs every unfinished shard of a planned run as worker processes, then reduces.

    Attributes:
        workers: Worker processes at once.
        shard_retries: Extra attempts for a shard whose process fails (not for exit 42).
        endpoint_url: S3 endpoint passed to workers as ``AWS_ENDPOINT_URL``.
        show_progress: Draw the progress bar (it switches itself off when stderr is not a terminal).
        poll_seconds: How often processes and storage are polled.
    """

    workers: int = 4
    shard_retries: int = 2
    endpoint_url: str | None = None
    show_progress: bool = True
    poll_seconds: float = 0.5
    failed_shards: dict[int, str] = field(default_factory=dict)

    def _start(self, storage, index: int, attempt: int, log_dir: Path, gpus: str | None = None) -> _Slot:
        env = dict(os.environ)
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus
        if self.endpoint_url:
            env["AWS_ENDPOINT_URL"] = self.endpoint_url
        env.setdefault("DFK8S_LOG_LEVEL", "INFO")
        log_path = log_dir / f"shard-{index:05d}.log"
        with open(log_path, "ab") as log_file:
            # A new session: Ctrl-C reaches only us, and we stop the workers in order.
            process = subprocess.Popen(
                [sys.executable, "-m", "dfk8s", "worker", "--run", storage.url(), "--index", str(index)],
                stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return _Slot(index, attempt, process, log_path, gpus)

    def execute(self, storage, spec: RunSpec) -> Summary:
        """Run the shards that have no done marker, then reduce; returns the summary."""
        done = {i for key in storage.list(layout.OUTPUT_PREFIX) if (i := layout.done_index(key)) is not None}
        queue = deque((i, 0) for i in range(spec.shards) if i not in done)
        log_dir = Path(tempfile.gettempdir()) / f"dfk8s-{spec.run_id}"
        log_dir.mkdir(parents=True, exist_ok=True)
        reader = ProgressReader(storage)
        running: list[_Slot] = []
        workers, gpu_sets = self.workers, None
        if spec.serving == "diffusers" and (gpus := visible_gpus()):
            gpu_sets = split_gpus(gpus, self.workers)  # each worker drives its own GPUs
            workers = len(gpu_sets)
        started, first = time.monotonic(), reader.poll()
        with progress_bar(spec.rows, enabled=self.show_progress) as bar:
            task = bar.add_task(spec.run_id, total=spec.rows, completed=first.rows, failed=first.failed,
                                rate="-")
            try:
                while queue or running:
                    while queue and len(running) < workers:
                        index, attempt = queue.popleft()
                        free = None
                        if gpu_sets is not None:
                            free = next(g for g in gpu_sets if g not in {s.gpus for s in running})
                        running.append(self._start(storage, index, attempt, log_dir, free))
                    time.sleep(self.poll_seconds)
                    for slot in [s for s in running if s.process.poll() is not None]:
                        running.remove(slot)
                        self._finished(slot, queue)
                    now = reader.poll()
                    rate = (now.rows - first.rows) / max(1e-6, time.monotonic() - started)
                    bar.update(task, completed=now.rows, failed=now.failed, rate=f"{rate:,.1f}")
            except KeyboardInterrupt:
                self._stop(running)
                raise Interrupted(spec.run_id) from None
            now = reader.poll()
            bar.update(task, completed=now.rows, failed=now.failed)
        return reduce_run(storage, failed_shards=sorted(self.failed_shards))

    def _finished(self, slot: _Slot, queue: deque) -> None:
        code = slot.process.returncode
        if code == 0:
            return
        tail = _tail(slot.log_path)
        if code == EXIT_DO_NOT_RETRY or slot.attempt >= self.shard_retries:
            why = "cannot succeed" if code == EXIT_DO_NOT_RETRY else f"failed {slot.attempt + 1} times"
            self.failed_shards[slot.index] = tail
            log.error("shard %d %s (exit %s): %s", slot.index, why, code, tail)
            return
        log.warning("shard %d exited with %s; retrying (%d/%d)", slot.index, code, slot.attempt + 1,
                    self.shard_retries)
        queue.append((slot.index, slot.attempt + 1))

    @staticmethod
    def _stop(running: list[_Slot]) -> None:
        for slot in running:
            if slot.process.poll() is None:
                slot.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for slot in running:
            try:
                slot.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                slot.process.kill()
                slot.process.wait()


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])[-500:]
