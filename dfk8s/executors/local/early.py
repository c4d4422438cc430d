"""Worker processes started first thing, before the launcher imports its planner: start-up overlaps.

Only light modules are imported here (the standard library, :mod:`~dfk8s.executors.local.pipe`, the run
layout and the servings registry): ``dfk8s run`` calls :func:`start_early` before it loads the planning
code, so the workers' interpreter start, imports and the serving's modules (a few tenths of a second) run
while the launcher loads and plans. :class:`~dfk8s.executors.local.executor.LocalExecutor` adopts them.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from dfk8s.executors.local.pipe import spawn_worker, worker_log_dir
from dfk8s.run.layout import RUN_SPEC_KEY


@dataclass
class EarlyWorkers:
    """Workers started before the run was planned, waiting for their first shard."""

    run_url: str
    run_id: str
    serving: str
    started: list[tuple[subprocess.Popen, Path]] = field(default_factory=list)

    def take(self) -> list[tuple[subprocess.Popen, Path]]:
        """Hand the workers over (to the executor); :meth:`discard` then has nothing to stop."""
        started, self.started = self.started, []
        return started

    def discard(self, timeout: float = 10.0) -> None:
        """Stop workers nobody took (the checks or the plan failed): at EOF an idle worker exits."""
        for process, _ in self.started:
            try:
                process.stdin.close()
            except OSError:
                pass
        for process, _ in self.take():
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def spawn_workers(run_url: str, run_id: str, serving: str, count: int, *,
                  endpoint_url: str | None = None) -> EarlyWorkers:
    """Start ``count`` workers of run ``run_url`` that preload ``serving`` and wait for their first shard."""
    log_dir = worker_log_dir(run_id)
    return EarlyWorkers(run_url, run_id, serving, [
        spawn_worker(run_url, number, parallelism=count, log_dir=log_dir, endpoint_url=endpoint_url,
                     preload=serving) for number in range(max(1, count))])


def local_run_url(output: str, run_id: str) -> str | None:
    """The URL a run in local folder ``output`` has (what its storage's ``url()`` says); None on S3."""
    if "://" in output:
        return None
    return str(Path(output).expanduser().absolute() / run_id)


def needs_gpus(serving: str) -> bool:
    """Whether ``serving``'s workers each drive GPUs of their own (unknown servings: the plan says so)."""
    from dfk8s.servings import SERVINGS

    info = SERVINGS.get(serving)
    return info is None or info.gpu


def start_early(output: str, run_id: str, serving: str | None, workers: int, *,
                endpoint_url: str | None = None) -> EarlyWorkers | None:
    """Start ``workers`` workers for a local run now; None where that is not done.

    Not for S3 output (the launcher checks the bucket first), nor for a GPU serving (its GPUs are split by
    the number of shards left, known after the plan). A planned run's serving is read from its run.json.
    """
    run_url = local_run_url(output, run_id)
    if run_url is None:
        return None
    try:
        planned = json.loads((Path(run_url) / RUN_SPEC_KEY).read_text())
        serving = planned.get("serving") or serving
    except (OSError, ValueError, AttributeError):
        pass
    if not serving or needs_gpus(serving):
        return None
    return spawn_workers(run_url, run_id, serving, workers, endpoint_url=endpoint_url)
