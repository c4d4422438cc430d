"""The launch front door of both executors: a request, its resume checks, and its plan (or dry run).

Imports no executor: ``dfk8s run`` (:mod:`dfk8s.executors.local.launch`) and ``dfk8s submit``
(:mod:`dfk8s.executors.kubernetes`) both plan through :func:`prepare_run` and :func:`dry_run`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from dfk8s.errors import NotFound, SpecError, StorageError, UsageError
from dfk8s.pipelines import check_serving, get_pipeline
from dfk8s.plan.planner import plan
from dfk8s.run import layout
from dfk8s.run.spec import DEFAULT_SAVE_INTERVAL, SERVING_OPTION_NAMES, RunSpec, new_run_id
from dfk8s.servings import check_flags_take_effect, serving_defaults
from dfk8s.storage import Storage, open_storage

log = logging.getLogger(__name__)

#: RunRequest fields (and their flags) that run.json freezes: a resume may not change them.
_SPEC_FIELDS = {"serving": "--serving", "input_key": "--input-key", "image_key": "--image-key",
                "output_key": "--output-key", "id_key": "--id-key", "save_interval": "--save-interval",
                "seed": "--seed", "rows_per_shard": "--rows-per-shard", "shards": "--shards",
                "limit": "--limit", "sample": "--sample"}


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
    save_interval: int = DEFAULT_SAVE_INTERVAL
    seed: int = 0
    parallelism: int = 1
    endpoint_url: str | None = None
    max_cost: float | None = None
    prices: str | None = None
    given: set[str] | None = None
    limit: int | None = None
    sample: int | None = None


def _same_source(source: str) -> str:
    """A manifest location in one canonical form (absolute local path, or the URI as given)."""
    return source if "://" in source else os.path.abspath(os.path.expanduser(source))


def finished_run(source: str, output: str | None, endpoint_url: str | None = None) -> Storage | None:
    """The finished run ``--input`` names, if it names one; None for an ordinary manifest.

    A run is named by its folder or ``s3://`` prefix, its result.jsonl, or its id under ``--output``.
    """
    if "://" not in source and not os.path.exists(source):
        if output and "/" not in source and not any(c in source for c in "*?["):
            candidate = run_storage(output, source, endpoint_url)  # a run id
            return candidate if candidate.exists(layout.RUN_SPEC_KEY) else None
        return None
    location = source.rstrip("/")
    if location.endswith("/" + layout.RESULT_KEY):
        location = location[: -len(layout.RESULT_KEY) - 1]
    elif "://" not in location and not os.path.isdir(location):
        return None  # a manifest file
    elif "://" in location and location.rsplit("/", 1)[-1].endswith((".json", ".jsonl", ".parquet", ".pq")):
        return None  # an S3 manifest file: no extra request
    try:
        candidate = open_storage(location, endpoint_url=endpoint_url)
        return candidate if candidate.exists(layout.RUN_SPEC_KEY) else None
    except StorageError:
        return None


def resolve_input(request: RunRequest) -> tuple[str, dict | None, str | None]:
    """Where a new run reads its rows, and the finished run they come from (None for a manifest).

    A finished run as ``--input`` is read from its result.jsonl. The next stage's image key defaults to
    the previous stage's output key when that stage made images (text2image, imageedit), else to the
    key its images were read from (caption, vqa).

    Returns:
        The manifest, the previous run (``run``, ``pipeline``, ``output_key``, ``image_key``), and the
        image key to use.

    Raises:
        UsageError: The run named has not finished (no result.jsonl yet).
    """
    previous = finished_run(request.input, request.output, request.endpoint_url)
    if previous is None:
        return _same_source(request.input), None, request.image_key
    spec = RunSpec.load(previous)
    if not previous.exists(layout.RESULT_KEY):
        raise UsageError(f"--input {request.input} is run {spec.run_id}, which has not finished (no "
                         f"{layout.RESULT_KEY} yet): finish it first (dfk8s run --run-id {spec.run_id})")
    pipeline = get_pipeline(spec.pipeline)
    output_key = spec.output_key or pipeline.output_key
    image_key = request.image_key or (output_key if pipeline.output_kind == "images" else spec.image_key)
    return previous.url(layout.RESULT_KEY), {"run": previous.url(), "run_id": spec.run_id,
                                              "pipeline": spec.pipeline, "output_key": output_key,
                                              "image_key": spec.image_key}, image_key


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
        raise UsageError(f"run {spec.run_id} is a {spec.pipeline} run, not {request.pipeline}")
    if request.input and resolve_input(request)[0] != _same_source(spec.input):
        raise UsageError(f"run {spec.run_id} was planned from {spec.input}, not {request.input}; "
                        "resume without --input, or start a new run")
    given = request.given
    if given is None:  # a caller that does not say which flags were given (submit, Python): keep run.json
        if request.serving and request.serving != spec.serving:
            raise UsageError(f"run {spec.run_id} uses serving {spec.serving}, not {request.serving}")
        return
    for name, value in request.options.items():
        if value is None or name not in given:
            continue
        frozen = spec.options.get(name)
        if frozen != value:
            raise UsageError(f"{_flag(name)} {value} differs from run {spec.run_id}'s {frozen} (run.json); a "
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
            raise UsageError(f"{_flag(name)} {value} differs from run {spec.run_id}'s {frozen} (run.json); "
                            "a planned run keeps it: resume without the flag, or start a new run")


def record_session(storage, entry: dict) -> None:
    """Append ``entry`` (``action``, ``seconds``, ...) to run.json's history; a failure only warns."""
    try:
        spec = RunSpec.load(storage)
        spec.history.append({"at": round(time.time(), 3), **entry})
        spec.save(storage)
    except (SpecError, StorageError) as exc:
        log.warning("could not record the session in run.json: %s", exc)


def _existing_run(request: RunRequest, storage: Storage, run_id: str) -> RunSpec | None:
    """The planned run ``run_id`` if there is one, checked against the request (the resume checks)."""
    spec = existing_spec(storage)
    if spec is not None:
        check_resume(spec, request)
        if request.given is None and request.input and (request.limit, request.sample) != (spec.limit,
                                                                                         spec.sample):
            raise UsageError(f"run {run_id} was planned with --limit {spec.limit} --sample {spec.sample}, "
                            f"not --limit {request.limit} --sample {request.sample}; resume without "
                            "--input, or start a new run")
    return spec


def _new_spec(request: RunRequest, run_id: str) -> RunSpec:
    """A new run's spec from the request (the checks a new run needs before it is planned)."""
    if not request.pipeline:
        raise UsageError(f"run {run_id} does not exist under {request.output}; pass --pipeline and --input "
                        "to start it")
    pipeline = get_pipeline(request.pipeline)
    serving = request.serving or pipeline.default_serving
    check_serving(pipeline, serving)
    if not request.input:
        raise UsageError(f"run {run_id} does not exist under {request.output}; pass --input to start it")
    if request.image_root and "://" not in request.image_root and not os.path.isdir(request.image_root):
        raise UsageError(f"--image-root {request.image_root} does not exist (or is not a folder)")
    if request.options.get("api_mode") == "batch":
        from dfk8s.servings.batch_mode import check_batch_mode

        check_batch_mode(request.pipeline, serving)
    given = {k: v for k, v in request.options.items() if v is not None}
    check_flags_take_effect(pipeline, serving, {k: v for k, v in given.items() if k in SERVING_OPTION_NAMES
                                                and (request.given is None or k in request.given)})
    if not pipeline.uses_images:
        for flag, value in (("--image-key", request.image_key), ("--image-root", request.image_root)):
            if value:
                raise UsageError(f"{flag} has no effect on {pipeline.name}, which reads no input image")
    source, input_run, image_key = resolve_input(request)
    # The serving's registered defaults under the flags: the same options submit resolves.
    return RunSpec(run_id=run_id, pipeline=request.pipeline, serving=serving,
                   options={**serving_defaults(serving, request.pipeline), **given},
                   input=source, input_key=request.input_key, image_key=image_key, input_run=input_run,
                   output_key=request.output_key, id_key=request.id_key, parallelism=request.parallelism,
                   save_interval=request.save_interval, seed=request.seed, limit=request.limit,
                   sample=request.sample)


def prepare_run(request: RunRequest, *, stage_images: bool = False,
                on_row=None, executor: str = "local") -> tuple[Storage, RunSpec, bool]:
    """Plan a new run, or load the existing one when ``run_id`` names a planned run.

    A new run's cost is estimated while it is planned (``cost.json``); with ``max_cost`` set, a run whose
    estimate is over it is refused before any request. A resumed run takes the new ``max_cost``.

    Returns:
        The run's storage, its spec, and whether it was resumed.

    Raises:
        SpecError: Bad pipeline/serving, no input for a new run, a resume that does not match, no price
            known for the model, or an estimate over ``max_cost``.
    """
    from dfk8s.cost import budget
    from dfk8s.cost import pricing as cost

    run_id = request.run_id or new_run_id()
    storage = run_storage(request.output, run_id, request.endpoint_url)
    spec = _existing_run(request, storage, run_id)
    if spec is not None:
        log.info("resuming run %s (%d shards)", run_id, spec.shards)
        if storage.exists(layout.BREAKER_KEY):  # a resume tries again; a mistake still there trips it again
            storage.delete(layout.BREAKER_KEY)
        if request.max_cost is not None:
            budget.set_budget(storage, request.max_cost)
        return storage, spec, True
    spec = _new_spec(request, run_id)
    serving = spec.serving
    prices = _prices_for(request, serving, spec.options)
    tally = cost.Tally()
    plan(spec, storage, rows_per_shard=request.rows_per_shard, shards=request.shards,
         image_root=request.image_root, stage_images=stage_images, endpoint_url=request.endpoint_url,
         on_row=on_row, tally=tally, executor=executor)
    if prices is not None:
        estimate = cost.estimate(tally, serving, spec.options, prices, spec.pipeline)
        budget.write_cost_record(storage, prices=prices, est=estimate, serving=serving, options=spec.options,
                               max_cost=request.max_cost)
        try:
            budget.check_estimate(estimate, request.max_cost)
        except SpecError as exc:
            raise SpecError(f"{exc}; run {run_id} is planned: resume it with --run-id {run_id} "
                            "and a higher --max-cost") from None
    return storage, spec, False


@dataclass
class DryRun:
    """What ``dfk8s run --dry-run`` found: the plan a real run would write, and its cost estimate."""

    spec: RunSpec
    storage: Storage
    resumed: bool
    good_rows: int
    estimate: Any = None


def dry_run(request: RunRequest, *, on_row=None, executor: str = "local") -> DryRun:
    """Everything :func:`prepare_run` does up to writing: plan in count-only mode and estimate the cost.

    Writes nothing anywhere. A planned run named by ``run_id`` is read (and its stored estimate shown).

    Raises:
        SpecError: As :func:`prepare_run` (the same resume checks), or no price known for the model.
    """
    from dfk8s.cost import budget
    from dfk8s.cost import pricing as cost

    run_id = request.run_id or new_run_id()
    storage = run_storage(request.output, run_id, request.endpoint_url)
    spec = _existing_run(request, storage, run_id) if request.run_id else None
    if spec is not None:
        record = budget.read_cost_record(storage) or {}
        saved = record.get("estimate")
        estimate = cost.Estimate(**saved) if saved else None
        return DryRun(spec, storage, True, estimate.requests if estimate else spec.rows, estimate)
    spec = _new_spec(request, run_id)
    serving = spec.serving
    prices = cost.load_prices(request.prices)
    tally = cost.Tally()
    plan(spec, storage, rows_per_shard=request.rows_per_shard, shards=request.shards,
         image_root=request.image_root, endpoint_url=request.endpoint_url, on_row=on_row, count_only=True,
         tally=tally, executor=executor)
    try:
        estimate = cost.estimate(tally, serving, spec.options, prices, spec.pipeline)
    except SpecError as exc:  # no price known: say so instead of guessing, and still show the plan
        estimate = cost.Estimate(model=cost.run_model(serving, spec.options) or serving,
                                 table=prices.describe(), requests=tally.requests, rows=tally.rows,
                                 no_cost=str(exc))
    return DryRun(spec, storage, False, tally.requests, estimate)


def _prices_for(request: RunRequest, serving: str, options: dict):
    """The price table for a new run, or None when its serving or model has no price.

    Raises:
        SpecError: ``--max-cost`` with a model the table has no price for (a budget needs prices).
    """
    from dfk8s.cost import pricing as cost

    model = cost.run_model(serving, options)
    if model is None:
        return None
    prices = cost.load_prices(request.prices)
    try:
        prices.price(model)
    except SpecError:
        if request.max_cost is not None:
            raise
        log.warning("no price known for %s: the run's cost is not estimated or counted", model)
        return None
    return prices
