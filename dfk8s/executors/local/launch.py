"""Launching on this machine: ``dfk8s run`` and ``dfk8s retry`` as library calls.

Both hold the run's lease, hand the planned (or reopened) shards to a :class:`LocalExecutor`, and record
the session in run.json's history. Planning itself is :mod:`dfk8s.plan.launch`, shared with ``submit``.
"""

from __future__ import annotations

import os
import time

from dfk8s.errors import Dfk8sError, RunNotFound, UsageError
from dfk8s.executors.local.executor import Interrupted, LocalExecutor, visible_gpus
from dfk8s.pipelines import serving_for
from dfk8s.plan.launch import RunRequest, existing_spec, prepare_run, record_session, run_storage
from dfk8s.reduce.reducer import Summary
from dfk8s.reduce.reopen import RetryPlan, plan_retry
from dfk8s.run.lease import RunLease
from dfk8s.run.progress import progress_bar
from dfk8s.run.spec import RunSpec, new_run_id
from dfk8s.servings import SERVINGS, require_credentials, require_installed

__all__ = ["check_gpu_work", "gpus_present", "retry_local", "run_local", "serving_of"]


def serving_of(request: RunRequest, frozen: RunSpec | None = None) -> str | None:
    """The serving a run will use: the planned run's, else the flag's, else the pipeline's default."""
    return frozen.serving if frozen is not None else serving_for(request.pipeline, request.serving)


def gpus_present() -> bool:
    """Whether this machine shows a GPU, cheaply (no torch import): CUDA_VISIBLE_DEVICES, else the driver."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return any(g.strip() and g.strip() != "-1" for g in listed.split(","))
    driver = "/proc/driver/nvidia/gpus"
    return (os.path.isdir(driver) and bool(os.listdir(driver))) or os.path.exists("/dev/nvidia0")


def check_gpu_work(request: RunRequest) -> None:
    """Refuse, before planning, GPU work this machine cannot do: no GPU and the model not at hand.

    A local model folder, or one in the Hugging Face cache, may still run on the CPU (slowly: tests and
    tiny models do); a Hub model with no GPU to run it on would fail every shard after a download.

    Raises:
        UsageError: No GPU here, and the model is neither a folder nor cached; or --fp8 without a GPU
            that runs it.
    """
    serving = serving_of(request)
    info = SERVINGS.get(serving or "")
    if info is not None and "fp8" in (info.options or ()) and request.options.get("fp8"):
        from dfk8s.servings.flux_speed import fp8_problem

        # torch numbers the visible GPUs 0..n-1, whatever CUDA_VISIBLE_DEVICES calls them
        devices = [f"cuda:{i}" for i in range(len(visible_gpus()))] if gpus_present() else []
        if problem := fp8_problem(devices or ["cpu"]):
            raise UsageError(problem)
    if info is None or not info.gpu or not request.input or gpus_present():
        return
    from dfk8s.models.hub import is_cached, is_hub_name

    model = request.options.get("model") or info.defaults_for(request.pipeline).get("model")
    if not model or not is_hub_name(model) or is_cached(model):
        return
    others = [name for name, s in SERVINGS.items() if request.pipeline in s.pipelines and s.is_api]
    raise UsageError(f"{request.pipeline} with the {serving} serving runs {model} on a GPU, and this machine "
                     f"has none (nor the model in its cache): use an API serving (--serving "
                     f"{' or '.join(others)}), run it on a cluster's GPUs (dfk8s submit), or give --model a "
                     "local folder")


def run_local(request: RunRequest, *, workers: int = 4, shard_retries: int = 2, show_progress: bool = False,
              started: float | None = None, on_planned=None, early=None) -> Summary:
    """Plan (or resume) and run everything on this machine; returns the reducer's summary.

    The workers start while the run is planned. The run's lease is held throughout (a second launcher on
    the same run is refused), and the session is recorded in run.json's history (so ``wall_seconds``
    counts time worked, not pauses). ``on_planned(storage, spec, resumed)`` is called once the plan is
    there; ``started`` is ``time.monotonic()`` when the command began; ``early`` are workers
    :func:`dfk8s.executors.local.early.start_early` started before anything else (else they start here).
    """
    started = time.monotonic() if started is None else started
    check_gpu_work(request)
    request.parallelism = workers
    request.run_id = request.run_id or new_run_id()
    storage = run_storage(request.output, request.run_id, request.endpoint_url)
    executor = LocalExecutor(workers=workers, shard_retries=shard_retries, endpoint_url=request.endpoint_url,
                             show_progress=show_progress, output=request.output, started=started)
    try:
        if early is not None and early.run_url == storage.url():
            executor.adopt(early)
        else:  # the workers start up (imports, the serving's modules) while the run is planned
            executor.prestart(storage.url(), request.run_id, serving_of(request, existing_spec(storage)))
        with RunLease(storage) as lease:
            executor.lease = lease
            # Planning reads, checks and shards every row (~40k rows/s): a million rows deserve a counter.
            with progress_bar(None, enabled=show_progress) as bar:
                task = bar.add_task("planning", total=None, failed=0, rate="-")
                storage, spec, resumed = prepare_run(request, on_row=lambda n: bar.update(task, completed=n))
            if on_planned is not None:
                on_planned(storage, spec, resumed)
            return _session(executor, storage, spec, action="resume" if resumed else "run", workers=workers,
                            started=started)
    finally:
        executor.discard()  # workers prestarted for a plan that failed


def retry_local(output: str, run_id: str, *, types: set[str] | None = None, all_errors: bool = False,
                changes: dict | None = None, serving: str | None = None, endpoint_url: str | None = None,
                workers: int = 4, shard_retries: int = 2, show_progress: bool = False,
                started: float | None = None, reopen_only: bool = False,
                on_reopened=None) -> tuple[RetryPlan, Summary | None]:
    """Reopen the failed rows of run ``run_id`` under ``output`` and run them here (``dfk8s retry``).

    Args:
        output: Where the run lives (a folder or ``s3://`` prefix).
        run_id: The run.
        types: Error types to reopen (None: the retryable ones).
        all_errors: Reopen every failed row, whatever its error.
        changes: Serving options that change for the retry (recorded in run.json's history).
        serving: A serving that replaces the run's.
        endpoint_url: The S3 endpoint.
        workers: Worker processes.
        shard_retries: Extra attempts for a shard whose worker fails.
        show_progress: Draw the progress bar.
        started: ``time.monotonic()`` when the command began.
        reopen_only: Only reopen the rows (a Kubernetes run's resubmit then runs them); sends nothing.
        on_reopened: Called with the :class:`RetryPlan` once the rows are reopened, before they run.

    Returns:
        What was reopened, and the reducer's summary (None with ``reopen_only``).

    Raises:
        RunNotFound: No run ``run_id`` under ``output``.
        SpecError: The serving's key is missing, or a change is not allowed.
        Interrupted: A signal stopped the retry (resume with the run id).
    """
    from dfk8s.storage import check_output

    started = time.monotonic() if started is None else started
    check_output(output, endpoint_url=endpoint_url)
    storage = run_storage(output, run_id, endpoint_url)
    spec = existing_spec(storage)
    if spec is None:
        raise RunNotFound(f"no run {run_id} under {output}")
    with RunLease(storage, command="retry") as lease:
        if not reopen_only:  # reopening sends nothing: a Kubernetes run's key lives in a Secret, not here
            require_installed(serving or spec.serving, {**spec.options, **(changes or {})})
            require_credentials(serving or spec.serving)
        spec, reopened = plan_retry(storage, types=types, all_errors=all_errors, options=changes or {},
                                    serving=serving)
        if on_reopened is not None:
            on_reopened(reopened)
        if reopen_only:
            return reopened, None
        executor = LocalExecutor(workers=workers, shard_retries=shard_retries, endpoint_url=endpoint_url,
                                 show_progress=show_progress, output=output, started=started, lease=lease)
        summary = _session(executor, storage, spec, action="retry-run", workers=workers, started=started,
                           only=set(reopened.shards))
    return reopened, summary


def _session(executor: LocalExecutor, storage, spec: RunSpec, *, action: str, workers: int, started: float,
             only: set[int] | None = None) -> Summary:
    """Run the shards (those in ``only``) to the reduce; record the session and how it ended in run.json."""
    outcome = "finished"
    try:
        return executor.follow(executor.start(storage, spec, only=only))
    except Interrupted:
        outcome = "interrupted"
        raise
    except Dfk8sError:
        outcome = "stopped"
        raise
    finally:
        record_session(storage, {"action": action, "outcome": outcome, "workers": workers,
                                 "seconds": round(time.monotonic() - started, 3)})
