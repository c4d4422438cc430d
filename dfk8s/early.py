"""Worker processes started first thing, before the launcher imports its planner: start-up overlaps.

Only the standard library is imported here: ``dfk8s run`` calls :func:`start_early` before it loads the
planning code, so the workers' interpreter start, imports and the serving's modules (a few tenths of a
second) run while the launcher loads and plans. :class:`dfk8s.executors.local.LocalExecutor` adopts them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

#: Environment variable a worker gets with its launcher's pid: it stops when that process is gone.
PARENT_PID_ENV = "DFK8S_PARENT_PID"


def worker_log_dir(run_id: str) -> Path:
    """Where the workers of run ``run_id`` write their logs (``$TMPDIR/dfk8s-<run id>``)."""
    log_dir = Path(tempfile.gettempdir()) / f"dfk8s-{run_id}"
    log_dir.mkdir(parents=True, exist_ok=True)
    return log_dir


def spawn_worker(run_url: str, number: int, *, parallelism: int, log_dir: Path, gpus: str | None = None,
                 endpoint_url: str | None = None,
                 preload: str | None = None) -> tuple[subprocess.Popen, Path]:
    """Start ``dfk8s worker --run RUN --serve``, its stderr in ``log_dir``; returns it and its log path.

    ``preload`` names a serving whose modules it imports while it waits for its first shard.
    """
    env = dict(os.environ)
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    if endpoint_url:
        env["AWS_ENDPOINT_URL"] = endpoint_url
    env.setdefault("DFK8S_LOG_LEVEL", "INFO")
    env[PARENT_PID_ENV] = str(os.getpid())
    env["DFK8S_PARALLELISM"] = str(parallelism)  # --rpm is split by the workers really running
    if preload:
        env["DFK8S_PRELOAD_SERVING"] = preload
    log_path = log_dir / f"worker-{number:03d}.log"
    with open(log_path, "ab") as log_file:
        # A new session: Ctrl-C reaches only the launcher, which stops the workers in order.
        process = subprocess.Popen(
            [sys.executable, "-m", "dfk8s", "worker", "--run", run_url, "--serve"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, env=env,
            start_new_session=True, text=True, bufsize=1)
    return process, log_path


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


def serving_guess(serving: str | None, pipeline: str | None) -> str | None:
    """The serving a new run will use: the flag's, else the pipeline's default (None if it has none)."""
    if serving:
        return serving
    from dfk8s.errors import SpecError  # light; imported here so this module stays standard-library only
    from dfk8s.pipelines import get_pipeline

    try:
        return get_pipeline(pipeline).default_serving if pipeline else None
    except SpecError:
        return None  # the plan says what is wrong with it


def local_run_url(output: str, run_id: str) -> str | None:
    """The URL a run in local folder ``output`` has (what its storage's ``url()`` says); None on S3."""
    if "://" in output:
        return None
    return str(Path(output).expanduser().absolute() / run_id)


def start_early(output: str, run_id: str, serving: str | None, workers: int, *,
                endpoint_url: str | None = None) -> EarlyWorkers | None:
    """Start ``workers`` workers for a local run now; None where that is not done.

    Not for S3 output (the launcher checks the bucket first), nor for ``diffusers`` (its GPUs are split by
    the number of shards left, known after the plan). A planned run's serving is read from its run.json.
    """
    run_url = local_run_url(output, run_id)
    if run_url is None:
        return None
    try:
        planned = json.loads((Path(run_url) / "run.json").read_text())
        serving = planned.get("serving") or serving
    except (OSError, ValueError, AttributeError):
        pass
    if not serving or serving == "diffusers":
        return None
    return spawn_workers(run_url, run_id, serving, workers, endpoint_url=endpoint_url)
