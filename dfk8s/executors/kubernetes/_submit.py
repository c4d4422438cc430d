"""Submitting a run: plan it to S3 and create its Jobs, or (``--dry-run``) show what that would do.

Public names are re-exported by :mod:`dfk8s.executors.kubernetes`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dfk8s.errors import KubernetesError, SpecError
from dfk8s.kube import (
    API_SERVINGS,
    ClusterOptions,
    KubeRunConfig,
    build_run_objects,
    check_credentials,
    kube_run_config,
)
from dfk8s.kube.profiles import Profile, load_profile
from dfk8s.plan.launch import RunRequest, run_storage
from dfk8s.run.spec import SERVING_OPTION_NAMES
from dfk8s.servings import serving_info

log = logging.getLogger(__name__)


def apply_profile_defaults(options: dict[str, Any], profile: Profile, explicit: set[str]) -> dict[str, Any]:
    """Return the serving options with the profile's defaults filled in where the user gave no flag."""
    merged = dict(options)
    for name, value in profile.defaults.items():
        if name in SERVING_OPTION_NAMES and name not in explicit and value is not None:
            merged[name] = value
    return merged


def _check_pod_paths(request: RunRequest) -> None:
    mask = request.options.get("mask")
    if mask and "://" not in str(mask):
        raise SpecError(
            f"--mask {mask} is on this machine and the pods cannot read it: upload it "
            "(aws s3 cp) and pass its s3:// URI"
        )


def resolve_resume(request: RunRequest) -> RunRequest:
    """Fill in what a resume may leave out (``--pipeline``, ``--serving``) from the planned run's run.json.

    Raises:
        RunNotFound: No ``--pipeline``, and ``run_id`` names no planned run (or none was given).

    """
    from dfk8s.errors import RunNotFound
    from dfk8s.plan.launch import existing_spec

    spec = None
    if request.run_id:
        spec = existing_spec(run_storage(request.output, request.run_id, request.endpoint_url))
    if spec is None:
        if not request.pipeline:
            raise RunNotFound(
                "--pipeline is required to start a new run"
                + (f" (there is no run {request.run_id} under {request.output})" if request.run_id else "")
            )
        return request
    return dataclasses.replace(
        request, pipeline=request.pipeline or spec.pipeline, serving=request.serving or spec.serving
    )


def _check_output(request: RunRequest) -> None:
    if not request.output.startswith("s3://"):
        raise SpecError(
            f"a cluster run needs --output s3://bucket/prefix (pods cannot see this machine's "
            f"disk), got {request.output!r}"
        )


# ----- dry run ----------------------------------------------------------------------------------


@dataclass
class Estimate:
    """How long an API run may take: ``requests / min(rpm, pods x concurrency x 60 / latency)``.

    Attributes:
        requests: One request per good row (rows with a plan-time problem are never sent; retries
            are not counted).
        per_minute: The rate the run can keep up.
        minutes: ``requests / per_minute``.
        bound: ``"rpm"`` when --rpm limits the rate, else ``"concurrency"``.
        latency: The seconds one request is assumed to take.
        concurrency: Requests in flight per pod.

    """

    requests: int
    per_minute: float
    minutes: float
    bound: str
    latency: float
    concurrency: int = 1


def estimate_api_time(
    serving: str, requests: int, pods: int, concurrency: int, rpm: float | None
) -> Estimate | None:
    """Estimate an API run's duration; None for servings that are not APIs (GPU time is not guessed)."""
    latency = API_SERVINGS.get(serving)
    if latency is None:
        return None
    by_concurrency = max(1, pods) * max(1, concurrency) * 60.0 / latency
    per_minute = min(rpm, by_concurrency) if rpm else by_concurrency
    return Estimate(
        requests=requests,
        per_minute=per_minute,
        minutes=requests / per_minute,
        bound="rpm" if rpm and rpm <= by_concurrency else "concurrency",
        latency=latency,
        concurrency=concurrency,
    )


@dataclass
class DryRun:
    """What ``submit --dry-run`` found: the objects, and the plan it would write."""

    objects: list[dict]
    config: KubeRunConfig
    rows: int
    good_rows: int
    shards: int
    rows_per_shard: int
    planned: bool
    options: dict[str, Any]
    estimate: Estimate | None
    warnings: list[str] = field(default_factory=list)
    cost: Any = None
    #: The default shard-size rule and the expected time of one shard (None: sizes were given or frozen).
    shard_size: Any = None


def count_plan(request: RunRequest) -> tuple[int, int, int, int]:
    """Read the manifest as planning would (rows checked, images decoded) without writing anything.

    Returns:
        ``(rows, good rows, shards, rows per shard)``.

    """
    rows, good, shards, rows_per_shard, _ = _count_plan_and_cost(request)
    return rows, good, shards, rows_per_shard


def _count_plan_and_cost(request: RunRequest):
    """``plan()`` in count-only mode (the same code as a real plan, nothing written), plus the estimate."""
    from dfk8s.plan.launch import dry_run as plan_dry_run

    found = plan_dry_run(dataclasses.replace(request, run_id=None), executor="kubernetes")
    spec = found.spec
    return spec.rows, found.good_rows, spec.shards, spec.rows_per_shard, found.estimate


def _checked(request: RunRequest, options: ClusterOptions) -> tuple[RunRequest, str, list[str]]:
    """What dry_run and submit check first: output and pod paths, the resume, serving and credentials.

    Returns:
        The request (a resume's pipeline and serving read from run.json), its serving, and the
        credential warnings.
    """
    from dfk8s.pipelines import check_serving, get_pipeline

    _check_output(request)
    _check_pod_paths(request)
    request = resolve_resume(request)
    serving = request.serving or get_pipeline(request.pipeline).default_serving
    check_serving(get_pipeline(request.pipeline), serving)
    return request, serving, check_credentials(serving, options)


def dry_run(request: RunRequest, options: ClusterOptions, *, explicit: set[str] = frozenset()) -> DryRun:
    """Everything ``submit`` would do up to creating objects, writing nothing anywhere.

    A run named by ``--run-id`` that is already planned is read (its run.json) instead of the manifest.
    """
    from dfk8s.plan.launch import check_resume
    from dfk8s.run.spec import RunSpec, new_run_id

    request, serving, warnings = _checked(request, options)
    run_id = request.run_id or new_run_id()
    storage = run_storage(request.output, run_id, request.endpoint_url)
    spec, shard_size = None, None
    if request.run_id:
        try:
            spec = RunSpec.load(storage)
        except SpecError:
            if not request.input:
                raise
    if spec is not None:
        check_resume(spec, request)  # the refusals a real submit makes
        profile = load_profile(spec.pipeline, spec.serving)
        rows = good = spec.rows
        shards, rows_per_shard, serving_options = spec.shards, spec.rows_per_shard, spec.options
        cost = _stored_estimate(storage)
    else:
        if not request.input:
            raise SpecError("--input is needed (or --run-id of a planned run)")
        profile = load_profile(request.pipeline, serving)
        kube_run_config(options, profile, run_id=run_id, run_uri=storage.url(), shards=1,
                        api_mode=request.options.get("api_mode"), endpoint_url=request.endpoint_url)
        serving_options = apply_profile_defaults(request.options, profile, explicit)
        rows, good, shards, rows_per_shard, cost = _count_plan_and_cost(
            dataclasses.replace(request, options=serving_options, serving=serving,
                                parallelism=options.parallelism))
        if not (request.shards or request.rows_per_shard):
            from dfk8s.plan.sizing import default_shard_size

            shard_size = default_shard_size(rows, serving, serving_options, options.parallelism, "kubernetes")
    if not shards:
        raise SpecError(f"{request.input}: the manifest has no rows; nothing to submit")
    config = kube_run_config(options, profile, run_id=run_id, run_uri=storage.url(), shards=shards,
                             api_mode=serving_options.get("api_mode"), endpoint_url=request.endpoint_url,
                             serving_options=serving_options)
    warnings = _model_cache_warnings(warnings, config, serving_options)
    pods = min(options.parallelism, shards)
    estimate = estimate_api_time(
        profile.serving,
        good,
        pods,
        serving_info(profile.serving).concurrency(serving_options),
        serving_options.get("rpm"),
    )
    return DryRun(
        objects=build_run_objects(config),
        config=config,
        rows=rows,
        good_rows=good,
        shards=shards,
        rows_per_shard=rows_per_shard,
        planned=spec is not None,
        options=serving_options,
        estimate=estimate,
        warnings=warnings,
        cost=cost,
        shard_size=shard_size,
    )


def _stored_estimate(storage):
    from dfk8s.cost.budget import read_cost_record
    from dfk8s.cost.pricing import Estimate

    saved = (read_cost_record(storage) or {}).get("estimate")
    return Estimate(**saved) if saved else None


# ----- submit -----------------------------------------------------------------------------------


@dataclass
class Submission:
    """A submitted run."""

    run_id: str
    namespace: str
    run_uri: str
    storage: Any
    spec: Any
    resumed: bool
    jobs: list[str]
    warnings: list[str] = field(default_factory=list)


def submit(
    request: RunRequest,
    options: ClusterOptions,
    clients,
    *,
    explicit: set[str] = frozenset(),
    on_row: Callable[[int], None] | None = None,
) -> Submission:
    """Plan the run to S3 (staging local images), then create its map and reduce Jobs.

    Args:
        request: The run, as ``dfk8s run`` takes it; ``output`` must be ``s3://``.
        options: The cluster side.
        clients: :class:`dfk8s.kube.client.KubeClients`.
        explicit: Serving option names the user set on the command line (profile defaults fill the rest).
        on_row: Planning progress callback.

    Raises:
        SpecError: Bad flags, missing Secret reference, a manifest with no rows, a resume whose given flags
            differ from run.json (``request.given``).
        RunNotFound: No pipeline, and ``run_id`` names no planned run.
        KubernetesError: The cluster refused (e.g. "already exists" when the run's Jobs are still there).

    """
    from dfk8s.plan.launch import prepare_run
    from dfk8s.run.spec import new_run_id

    request, serving, warnings = _checked(request, options)
    profile = load_profile(request.pipeline, serving)
    request = dataclasses.replace(
        request,
        run_id=request.run_id or new_run_id(),
        parallelism=options.parallelism,
        options=apply_profile_defaults(request.options, profile, explicit),
    )
    run_uri = run_storage(request.output, request.run_id, request.endpoint_url).url()
    # Everything the Jobs need is checked before a single shard is written.
    kube_run_config(options, profile, run_id=request.run_id, run_uri=run_uri, shards=request.shards or 1,
                    api_mode=request.options.get("api_mode"), endpoint_url=request.endpoint_url)
    warnings += check_cluster(clients, options)
    storage, spec, resumed = prepare_run(request, stage_images=True, on_row=on_row, executor="kubernetes")
    if not spec.shards:
        raise SpecError(f"{request.input}: the manifest has no rows; nothing to submit")
    return start_jobs(clients, options, storage, spec, warnings=warnings, endpoint_url=request.endpoint_url,
                      resumed=resumed)


def start_jobs(
    clients,
    options: ClusterOptions,
    storage,
    spec,
    *,
    warnings: list[str],
    endpoint_url: str | None = None,
    resumed: bool = False,
) -> Submission:
    """Create the Jobs of a run planned on S3 (what the executor's ``start`` does once it is checked).

    The pods get run.json's settings: a resumed batch-mode run keeps its small pods without
    ``--api-mode batch`` on the command line.

    Args:
        clients: :class:`dfk8s.kube.client.KubeClients`.
        options: The cluster side.
        storage: The run's storage.
        spec: Its spec.
        warnings: The credential and cluster warnings found before planning.
        endpoint_url: S3 endpoint from here (the pods' unless ``--cluster-s3-endpoint``).
        resumed: The run was planned before this submit.

    """
    profile = load_profile(spec.pipeline, spec.serving)
    config = kube_run_config(options, profile, run_id=spec.run_id, run_uri=storage.url(), shards=spec.shards,
                             api_mode=spec.options.get("api_mode"), endpoint_url=endpoint_url,
                             serving_options=spec.options)
    warnings = _model_cache_warnings(warnings, config, spec.options)
    names = create_jobs(clients, config)
    return Submission(
        run_id=spec.run_id,
        namespace=config.namespace,
        run_uri=storage.url(),
        storage=storage,
        spec=spec,
        resumed=resumed,
        jobs=names,
        warnings=warnings,
    )


def _model_cache_warnings(warnings: list[str], config: KubeRunConfig, options: dict[str, Any]) -> list[str]:
    from dfk8s.kube.model_jobs import merge_warnings, model_cache_warnings

    return merge_warnings(warnings, model_cache_warnings(config, options.get("model")), config)


def check_cluster(clients, options: ClusterOptions) -> list[str]:
    """Refuse what the cluster would leave stuck; return warnings about the cluster itself.

    Raises:
        SpecError: The reduce Job's ServiceAccount does not exist: its pods could never be created,
            and the run would show "reducing" forever.

    """
    from dfk8s.kube.client import server_version, service_account_exists
    from dfk8s.kube.versions import SUPPORTED_KUBERNETES, is_supported

    warnings = []
    version = server_version(clients)
    if version and not is_supported(version):
        oldest, newest = SUPPORTED_KUBERNETES
        warnings.append(
            f"the cluster runs Kubernetes {version}, outside the range dfk8s supports ({oldest} to {newest})"
        )
    account = options.service_account
    if account and service_account_exists(clients, options.namespace, account) is False:
        raise SpecError(
            f"ServiceAccount {account} not found in namespace {options.namespace}: the reduce Job's pods "
            f"could never be created. Install the chart there (helm install dfk8s charts/dfk8s -n "
            f"{options.namespace}; its reducer account is <release>-dfk8s-reducer) or pass the "
            "--service-account of an account that exists"
        )
    return warnings


def create_jobs(clients, config: KubeRunConfig) -> list[str]:
    """Create the map Job, then the reduce Job; if the second fails, delete the first again."""
    from dfk8s.kube.client import api_errors

    created: list[str] = []
    try:
        for job in build_run_objects(config):
            name = job["metadata"]["name"]
            with api_errors(f"creating job {name}"):
                clients.batch.create_namespaced_job(config.namespace, job, _request_timeout=30)
            created.append(name)
    except KubernetesError as exc:
        for name in created:  # a map Job without its reducer would finish with nobody assembling it
            try:
                with api_errors(f"deleting job {name}"):
                    clients.batch.delete_namespaced_job(
                        name, config.namespace, propagation_policy="Background"
                    )
            except KubernetesError as cleanup:
                log.warning("could not delete job %s again: %s", name, cleanup)
        if getattr(exc, "status", None) == 409:
            raise KubernetesError(
                f"{exc} in namespace {config.namespace}: the run's Jobs are still there "
                f"(`dfk8s status {config.run_id}`; `dfk8s cancel {config.run_id}` first to "
                "submit it again, its data stays)"
            ) from None
        raise
    return created
