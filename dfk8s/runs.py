"""Starting and resuming runs from Python: the library behind ``dfk8s run`` (and ``dfk8s submit``)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from dfk8s import layout
from dfk8s.errors import NotFound, SpecError, StorageError
from dfk8s.pipelines import check_serving, get_pipeline
from dfk8s.plan import plan
from dfk8s.spec import RunSpec, new_run_id
from dfk8s.storage import Storage, open_storage

log = logging.getLogger(__name__)

#: RunRequest fields (and their flags) that run.json freezes: a resume may not change them.
_SPEC_FIELDS = {"serving": "--serving", "input_key": "--input-key", "image_key": "--image-key",
                "output_key": "--output-key", "id_key": "--id-key", "save_interval": "--save-interval",
                "seed": "--seed", "rows_per_shard": "--rows-per-shard", "shards": "--shards"}


@dataclass
class RunRequest:
    """What a user asks for; the flags of ``dfk8s run`` map one to one onto these fields.

    Attributes:
        pipeline: Pipeline name (None when resuming: run.json knows it).
        input: Manifest path or s3:// URI (may be omitted when resuming).
        output: Local folder or s3://bucket/prefix under which the run lives.
        run_id: Resume this run (or create it with this id).
        serving: Serving name; None for the pipeline's default.
        options: Serving options (model, api_url, concurrency, ...); no secrets.
        given: Names of the fields and options the user set explicitly (flags on the command line).
            A resume refuses those that differ from run.json; None (callers that cannot tell a default
            from a choice) checks only the pipeline, input and serving.
    """

    pipeline: str | None
    output: str
    input: str | None = None
    run_id: str | None = None
    serving: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    input_key: str | None = None
    image_key: str | None = None
    output_key: str | None = None
    id_key: str | None = None
    image_root: str | None = None
    shards: int | None = None
    rows_per_shard: int | None = None
    save_interval: int = 100
    seed: int = 0
    parallelism: int = 1
    endpoint_url: str | None = None
    given: set[str] | None = None


def _same_source(source: str) -> str:
    """A manifest location in one canonical form (absolute local path, or the URI as given)."""
    return source if "://" in source else os.path.abspath(os.path.expanduser(source))


def run_storage(output: str, run_id: str, endpoint_url: str | None = None) -> Storage:
    """The storage of run ``run_id`` under ``output``."""
    return open_storage(output, endpoint_url=endpoint_url).child(run_id)


def existing_spec(storage) -> RunSpec | None:
    """The run's spec when it is planned, else None."""
    try:
        return RunSpec.load(storage) if storage.exists(layout.RUN_SPEC_KEY) else None
    except NotFound:
        return None


def _flag(name: str) -> str:
    return _SPEC_FIELDS.get(name) or "--" + name.replace("_", "-")


def check_resume(spec: RunSpec, request: RunRequest) -> None:
    """Refuse a resume whose flags differ from what run.json froze (one line naming the flag).

    Raises:
        SpecError: A flag differs; the message points at ``dfk8s retry`` for serving options.
    """
    if request.pipeline and spec.pipeline != request.pipeline:
        raise SpecError(f"run {spec.run_id} is a {spec.pipeline} run, not {request.pipeline}")
    if request.input and _same_source(request.input) != _same_source(spec.input):
        raise SpecError(f"run {spec.run_id} was planned from {spec.input}, not {request.input}; "
                        "resume without --input, or start a new run")
    given = request.given
    if given is None:  # a caller that does not say which flags were given (submit, Python): keep run.json
        if request.serving and request.serving != spec.serving:
            raise SpecError(f"run {spec.run_id} uses serving {spec.serving}, not {request.serving}")
        return
    for name, value in request.options.items():
        if value is None or name not in given:
            continue
        frozen = spec.options.get(name)
        if frozen != value:
            raise SpecError(f"{_flag(name)} {value} differs from run {spec.run_id}'s {frozen} (run.json); a "
                            f"resume keeps the run's settings. To re-run its failed rows with {_flag(name)} "
                            f"{value}: dfk8s retry {spec.run_id} -o {request.output} {_flag(name)} {value}")
    for name in _SPEC_FIELDS:
        value = getattr(request, name)
        if value is None or name not in given:
            continue
        frozen = getattr(spec, name)
        if name == "shards" and value >= frozen:
            continue  # --shards is "at most N": the plan may have made fewer
        if frozen != value:
            raise SpecError(f"{_flag(name)} {value} differs from run {spec.run_id}'s {frozen} (run.json); "
                            "a planned run keeps it: resume without the flag, or start a new run")


def record_session(storage, entry: dict) -> None:
    """Append ``entry`` (``action``, ``seconds``, ...) to run.json's history; a failure only warns."""
    try:
        spec = RunSpec.load(storage)
        spec.history.append({"at": round(time.time(), 3), **entry})
        spec.save(storage)
    except (SpecError, StorageError) as exc:
        log.warning("could not record the session in run.json: %s", exc)


def prepare_run(request: RunRequest, *, stage_images: bool = False,
                on_row=None) -> tuple[Storage, RunSpec, bool]:
    """Plan a new run, or load the existing one when ``run_id`` names a planned run.

    Returns:
        The run's storage, its spec, and whether it was resumed.

    Raises:
        SpecError: Bad pipeline/serving, no input for a new run, or a resume that does not match.
    """
    run_id = request.run_id or new_run_id()
    storage = run_storage(request.output, run_id, request.endpoint_url)
    spec = existing_spec(storage)
    if spec is not None:
        check_resume(spec, request)
        log.info("resuming run %s (%d shards)", run_id, spec.shards)
        return storage, spec, True
    if not request.pipeline:
        raise SpecError(f"run {run_id} does not exist under {request.output}; pass --pipeline and --input "
                        "to start it")
    pipeline = get_pipeline(request.pipeline)
    serving = request.serving or pipeline.default_serving
    check_serving(pipeline, serving)
    if not request.input:
        raise SpecError(f"run {run_id} does not exist under {request.output}; pass --input to start it")
    if request.image_root and "://" not in request.image_root and not os.path.isdir(request.image_root):
        raise SpecError(f"--image-root {request.image_root} does not exist (or is not a folder)")
    spec = RunSpec(run_id=run_id, pipeline=request.pipeline, serving=serving,
                   options={k: v for k, v in request.options.items() if v is not None},
                   input=_same_source(request.input), input_key=request.input_key,
                   image_key=request.image_key,
                   output_key=request.output_key, id_key=request.id_key, parallelism=request.parallelism,
                   save_interval=request.save_interval, seed=request.seed)
    plan(spec, storage, rows_per_shard=request.rows_per_shard, shards=request.shards,
         image_root=request.image_root, stage_images=stage_images, endpoint_url=request.endpoint_url,
         on_row=on_row)
    return storage, spec, False


def run_local(request: RunRequest, *, workers: int = 4, shard_retries: int = 2, show_progress: bool = False):
    """Plan (or resume) and run everything on this machine; returns the reducer's summary.

    The run's lease is held throughout (a second launcher on the same run is refused), and the session
    is recorded in run.json's history (so ``wall_seconds`` counts time worked, not pauses).
    """
    from dfk8s.executors.local import Interrupted, LocalExecutor
    from dfk8s.lease import RunLease

    started = time.monotonic()
    request.parallelism = workers
    request.run_id = request.run_id or new_run_id()
    lease = RunLease(run_storage(request.output, request.run_id, request.endpoint_url)).acquire()
    try:
        storage, spec, resumed = prepare_run(request)
        executor = LocalExecutor(workers=workers, shard_retries=shard_retries,
                                 endpoint_url=request.endpoint_url, show_progress=show_progress,
                                 output=request.output, started=started)
        outcome = "finished"
        try:
            return executor.execute(storage, spec)
        except Interrupted:
            outcome = "interrupted"
            raise
        finally:
            record_session(storage, {"action": "resume" if resumed else "run", "outcome": outcome,
                                     "workers": workers, "seconds": round(time.monotonic() - started, 3)})
    finally:
        lease.release()
