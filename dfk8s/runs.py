"""Starting and resuming runs from Python: the library behind ``dfk8s run`` (and ``dfk8s submit``)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from dfk8s import layout
from dfk8s.errors import SpecError
from dfk8s.pipelines import check_serving, get_pipeline
from dfk8s.plan import plan
from dfk8s.servings import serving_defaults
from dfk8s.spec import RunSpec, new_run_id
from dfk8s.storage import Storage, open_storage

log = logging.getLogger(__name__)


@dataclass
class RunRequest:
    """What a user asks for; the flags of ``dfk8s run`` map one to one onto these fields.

    Attributes:
        pipeline: Pipeline name.
        input: Manifest path or s3:// URI (may be omitted when resuming).
        output: Local folder or s3://bucket/prefix under which the run lives.
        run_id: Resume this run (or create it with this id).
        serving: Serving name; None for the pipeline's default.
        options: Serving options (model, api_url, concurrency, ...); no secrets.
    """

    pipeline: str
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


def _same_source(source: str) -> str:
    """A manifest location in one canonical form (absolute local path, or the URI as given)."""
    return source if "://" in source else os.path.abspath(os.path.expanduser(source))


def run_storage(output: str, run_id: str, endpoint_url: str | None = None) -> Storage:
    """The storage of run ``run_id`` under ``output``."""
    return open_storage(output, endpoint_url=endpoint_url).child(run_id)


def prepare_run(request: RunRequest, *, stage_images: bool = False,
                on_row=None, executor: str = "local") -> tuple[Storage, RunSpec, bool]:
    """Plan a new run, or load the existing one when ``run_id`` names a planned run.

    Returns:
        The run's storage, its spec, and whether it was resumed.

    Raises:
        SpecError: Bad pipeline/serving, no input for a new run, or a resume that does not match.
    """
    pipeline = get_pipeline(request.pipeline)
    serving = request.serving or pipeline.default_serving
    check_serving(pipeline, serving)
    run_id = request.run_id or new_run_id()
    storage = run_storage(request.output, run_id, request.endpoint_url)
    if storage.exists(layout.RUN_SPEC_KEY):
        spec = RunSpec.load(storage)
        if spec.pipeline != request.pipeline:
            raise SpecError(f"run {run_id} is a {spec.pipeline} run, not {request.pipeline}")
        if request.input and _same_source(request.input) != _same_source(spec.input):
            raise SpecError(f"run {run_id} was planned from {spec.input}, not {request.input}; "
                            "resume without --input, or start a new run")
        log.info("resuming run %s (%d shards)", run_id, spec.shards)
        if storage.exists(layout.BREAKER_KEY):  # a resume tries again; a mistake still there trips it again
            storage.delete(layout.BREAKER_KEY)
        return storage, spec, True
    if not request.input:
        raise SpecError(f"run {run_id} does not exist under {request.output}; pass --input to start it")
    given = {k: v for k, v in request.options.items() if v is not None}
    # The serving's registered defaults under the flags: the same options submit resolves.
    spec = RunSpec(run_id=run_id, pipeline=request.pipeline, serving=serving,
                   options={**serving_defaults(serving, request.pipeline), **given},
                   input=_same_source(request.input), input_key=request.input_key,
                   image_key=request.image_key,
                   output_key=request.output_key, id_key=request.id_key, parallelism=request.parallelism,
                   save_interval=request.save_interval, seed=request.seed)
    plan(spec, storage, rows_per_shard=request.rows_per_shard, shards=request.shards,
         image_root=request.image_root, stage_images=stage_images, endpoint_url=request.endpoint_url,
         on_row=on_row, executor=executor)
    return storage, spec, False


def run_local(request: RunRequest, *, workers: int = 4, shard_retries: int = 2, show_progress: bool = False):
    """Plan (or resume) and run everything on this machine; returns the reducer's summary."""
    from dfk8s.executors.local import LocalExecutor

    request.parallelism = workers
    storage, spec, _ = prepare_run(request)
    executor = LocalExecutor(workers=workers, shard_retries=shard_retries, endpoint_url=request.endpoint_url,
                             show_progress=show_progress)
    return executor.execute(storage, spec)
