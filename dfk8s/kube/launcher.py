"""The Kubernetes executor: plan a run to S3, create its map and reduce Jobs, follow it, report on it.

``dfk8s submit`` / ``status`` / ``list`` / ``cancel`` call these functions; they are usable from
Python without click. The Jobs themselves come from :mod:`dfk8s.kube.manifests`; what is asked of the
cluster goes through :mod:`dfk8s.kube.client`.

Secrets policy: a credential reaches the pods only as a Secret reference (``--api-key-secret``,
``--s3-secret``, ``--hf-token-secret``). Submitting never reads a key's value: an API serving
without ``--api-key-secret`` is refused (its pods would all exit 42), whether or not the key is set
in this shell, and the message says how to create the Secret.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dfk8s import layout
from dfk8s.errors import Dfk8sError, KubernetesError, NotFound, SpecError, StorageError
from dfk8s.kube.manifests import KubeRunConfig, build_run_objects
from dfk8s.kube.wait import JobState, job_state
from dfk8s.profiles import Profile, load_profile
from dfk8s.runs import RunRequest, run_storage

__all__ = [
    "API_SERVINGS",
    "ClusterOptions",
    "DryRun",
    "Estimate",
    "RunStatus",
    "Submission",
    "dry_run",
    "estimate_api_time",
    "cancel_run",
    "follow_run",
    "list_runs",
    "parse_node_selector",
    "parse_secret_ref",
    "parse_toleration",
    "run_state",
    "run_status",
    "submit",
]

log = logging.getLogger(__name__)

#: API servings, with the seconds one request is assumed to take for the time estimate. These are
#: guesses for typical hosted endpoints (a short caption; one 1024px image); real latency varies.
API_SERVINGS: dict[str, float] = {"openai-chat": 3.0, "openai-images": 20.0, "gemini-images": 10.0}
_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


@dataclass
class ClusterOptions:
    """The Kubernetes side of a submit (the flags beyond ``dfk8s run``'s).

    Attributes mirror :class:`dfk8s.kube.manifests.KubeRunConfig`; ``namespace`` is resolved already.
    """

    namespace: str
    image: str | None = None
    reducer_image: str | None = None
    cluster_s3_endpoint: str | None = None
    parallelism: int = 4
    queue: str | None = None
    api_key_secret: tuple[str, str] | None = None
    s3_secret: str | None = None
    hf_token_secret: tuple[str, str] | None = None
    gpus: int | None = None
    node_selector: Mapping[str, str] | None = None
    tolerations: tuple[Mapping[str, Any], ...] | None = None
    service_account: str | None = None
    backoff_limit_per_index: int = 2
    max_failed_indexes: int | None = None


# ----- flag parsing -----------------------------------------------------------------------------


def parse_secret_ref(text: str | None, flag: str) -> tuple[str, str] | None:
    """Read ``NAME/KEY`` (or ``NAME:KEY``) naming a key of a Secret.

    Raises:
        SpecError: Not of that shape (the message never repeats the text: it may be a key by mistake).

    """
    if text is None:
        return None
    for separator in ("/", ":"):
        name, found, key = text.partition(separator)
        if found and name and key and separator not in key:
            return name, key
    raise SpecError(
        f"{flag} takes a Secret reference NAME/KEY (e.g. dfk8s-api-key/DF_API_KEY), never the value itself"
    )


def parse_node_selector(items: tuple[str, ...]) -> dict[str, str] | None:
    """Read repeated ``key=value`` into a node selector (None when none was given)."""
    if not items:
        return None
    selector = {}
    for item in items:
        key, found, value = item.partition("=")
        if not found or not key:
            raise SpecError(f"--node-selector takes key=value, got {item!r}")
        selector[key] = value
    return selector


def parse_toleration(text: str) -> dict[str, str]:
    """Read ``key[=value]:Effect`` into a toleration (``Exists`` without a value, ``Equal`` with one)."""
    spec, found, effect = text.rpartition(":")
    if not found or effect not in _EFFECTS or not spec:
        raise SpecError(
            f"--toleration takes key[=value]:Effect with Effect one of {', '.join(_EFFECTS)}, got {text!r}"
        )
    key, has_value, value = spec.partition("=")
    if not key:
        raise SpecError(f"--toleration needs a key, got {text!r}")
    if has_value:
        return {"key": key, "operator": "Equal", "value": value, "effect": effect}
    return {"key": key, "operator": "Exists", "effect": effect}


def check_credentials(
    serving: str, options: ClusterOptions, environ: Mapping[str, str] = os.environ
) -> list[str]:
    """Refuse what would leave pods without a key; return warnings for what may.

    Raises:
        SpecError: An API serving without ``--api-key-secret``.

    """
    if serving in API_SERVINGS and options.api_key_secret is None:
        local = next(
            (name for name in ("DF_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY") if environ.get(name)), None
        )
        where = f"${local} stays on this machine: " if local else ""
        raise SpecError(
            f"serving {serving} needs an API key in the pods; {where}create a Secret "
            "(kubectl create secret generic dfk8s-api-key --from-literal=DF_API_KEY=...) "
            "and pass --api-key-secret dfk8s-api-key/DF_API_KEY"
        )
    warnings = []
    if options.s3_secret is None and environ.get("AWS_ACCESS_KEY_ID"):
        warnings.append(
            "pods get no S3 credentials (no --s3-secret): they need a workload identity "
            "(IRSA, GKE/Azure workload identity) that can read and write the output"
        )
    if options.hf_token_secret is None and serving == "diffusers" and environ.get("HF_TOKEN"):
        warnings.append("pods get no Hugging Face token (no --hf-token-secret): gated models will not load")
    if options.service_account is None:
        warnings.append(
            "the reduce Job runs as the namespace's default ServiceAccount; it must be allowed "
            "to get/list/watch jobs (the Helm chart's reducer account: --service-account)"
        )
    return warnings


def apply_profile_defaults(options: dict[str, Any], profile: Profile, explicit: set[str]) -> dict[str, Any]:
    """Return the serving options with the profile's defaults filled in where the user gave no flag."""
    from dfk8s.options import SERVING_OPTION_NAMES

    merged = dict(options)
    for name, value in profile.defaults.items():
        if name in SERVING_OPTION_NAMES and name not in explicit and value is not None:
            merged[name] = value
    return merged


def kube_run_config(
    request: RunRequest, options: ClusterOptions, profile: Profile, *, run_id: str, run_uri: str, shards: int
) -> KubeRunConfig:
    """Build the :class:`KubeRunConfig` of a run (validates names, secrets, GPUs, shards)."""
    return KubeRunConfig(
        run_id=run_id,
        pipeline=profile.pipeline,
        serving=profile.serving,
        run_uri=run_uri,
        shards=shards,
        parallelism=options.parallelism,
        namespace=options.namespace,
        profile=profile,
        image=options.image,
        reducer_image=options.reducer_image or (cpu_image() if profile.gpu else None),
        s3_endpoint=options.cluster_s3_endpoint or request.endpoint_url,
        queue=options.queue,
        api_key_secret=options.api_key_secret,
        s3_secret=options.s3_secret,
        hf_token_secret=options.hf_token_secret,
        gpus=options.gpus,
        node_selector=options.node_selector,
        tolerations=options.tolerations,
        service_account=options.service_account,
        backoff_limit_per_index=options.backoff_limit_per_index,
        max_failed_indexes=options.max_failed_indexes,
    )


def cpu_image() -> str:
    """The CPU image of this version (from the caption profile): what reducers run, even for FLUX runs."""
    return load_profile("caption").image


def _check_pod_paths(request: RunRequest) -> None:
    mask = request.options.get("mask")
    if mask and "://" not in str(mask):
        raise SpecError(
            f"--mask {mask} is on this machine and the pods cannot read it: upload it "
            "(aws s3 cp) and pass its s3:// URI"
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

    """

    requests: int
    per_minute: float
    minutes: float
    bound: str
    latency: float


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


def count_plan(request: RunRequest) -> tuple[int, int, int, int]:
    """Read the manifest as planning would (rows checked, images decoded) without writing anything.

    Returns:
        ``(rows, good rows, shards, rows per shard)``.

    """
    from dfk8s.manifest import Manifest
    from dfk8s.pipelines import get_pipeline
    from dfk8s.plan import DEFAULT_ROWS_PER_SHARD, RowChecker, default_image_root

    checker = RowChecker(
        get_pipeline(request.pipeline),
        request.input_key,
        request.image_key,
        request.id_key,
        default_image_root(request.input, request.image_root),
        stage_to=None,
        endpoint_url=request.endpoint_url,
    )
    rows = good = 0
    for item in Manifest(request.input, endpoint_url=request.endpoint_url):
        _, problems = checker.check(item)
        rows += 1
        good += not problems
    if request.shards:  # the same arithmetic as plan()
        rows_per_shard = max(1, math.ceil(rows / request.shards)) if rows else 1
    else:
        rows_per_shard = request.rows_per_shard or DEFAULT_ROWS_PER_SHARD
    return rows, good, math.ceil(rows / rows_per_shard), rows_per_shard


def dry_run(request: RunRequest, options: ClusterOptions, *, explicit: set[str] = frozenset()) -> DryRun:
    """Everything ``submit`` would do up to creating objects, writing nothing anywhere.

    A run named by ``--run-id`` that is already planned is read (its run.json) instead of the manifest.
    """
    from dfk8s.pipelines import check_serving, get_pipeline
    from dfk8s.spec import RunSpec, new_run_id

    _check_output(request)
    _check_pod_paths(request)
    serving = request.serving or get_pipeline(request.pipeline).default_serving
    check_serving(get_pipeline(request.pipeline), serving)
    warnings = check_credentials(serving, options)
    run_id = request.run_id or new_run_id()
    storage = run_storage(request.output, run_id, request.endpoint_url)
    spec = None
    if request.run_id:
        try:
            spec = RunSpec.load(storage)
        except SpecError:
            if not request.input:
                raise
    if spec is not None:
        if spec.pipeline != request.pipeline:
            raise SpecError(f"run {run_id} is a {spec.pipeline} run, not {request.pipeline}")
        profile = load_profile(spec.pipeline, spec.serving)
        rows = good = spec.rows
        shards, rows_per_shard, serving_options = spec.shards, spec.rows_per_shard, spec.options
    else:
        if not request.input:
            raise SpecError("--input is needed (or --run-id of a planned run)")
        profile = load_profile(request.pipeline, serving)
        kube_run_config(request, options, profile, run_id=run_id, run_uri=storage.url(), shards=1)
        rows, good, shards, rows_per_shard = count_plan(request)
        serving_options = apply_profile_defaults(request.options, profile, explicit)
    if not shards:
        raise SpecError(f"{request.input}: the manifest has no rows; nothing to submit")
    config = kube_run_config(request, options, profile, run_id=run_id, run_uri=storage.url(), shards=shards)
    pods = min(options.parallelism, shards)
    estimate = estimate_api_time(
        profile.serving,
        good,
        pods,
        int(serving_options.get("max_concurrency") or 64),
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
    )


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
        SpecError: Bad flags, missing Secret reference, a manifest with no rows.
        KubernetesError: The cluster refused (e.g. "already exists" when the run's Jobs are still there).

    """
    from dfk8s.pipelines import check_serving, get_pipeline
    from dfk8s.runs import prepare_run
    from dfk8s.spec import new_run_id

    _check_output(request)
    _check_pod_paths(request)
    serving = request.serving or get_pipeline(request.pipeline).default_serving
    check_serving(get_pipeline(request.pipeline), serving)
    warnings = check_credentials(serving, options)
    profile = load_profile(request.pipeline, serving)
    request = dataclasses.replace(
        request,
        run_id=request.run_id or new_run_id(),
        parallelism=options.parallelism,
        options=apply_profile_defaults(request.options, profile, explicit),
    )
    run_uri = run_storage(request.output, request.run_id, request.endpoint_url).url()
    # Everything the Jobs need is checked before a single shard is written.
    kube_run_config(request, options, profile, run_id=request.run_id, run_uri=run_uri, shards=1)
    storage, spec, resumed = prepare_run(request, stage_images=True, on_row=on_row)
    if not spec.shards:
        raise SpecError(f"{request.input}: the manifest has no rows; nothing to submit")
    if spec.serving != profile.serving:
        profile = load_profile(spec.pipeline, spec.serving)
    config = kube_run_config(
        request, options, profile, run_id=spec.run_id, run_uri=storage.url(), shards=spec.shards
    )
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


# ----- status -----------------------------------------------------------------------------------


def run_state(map_job: JobState | None, reduce_job: JobState | None) -> str:
    """One word for a run from its Jobs: queued, running, reducing, complete, partial, failed, ..."""
    if map_job is None and reduce_job is None:
        return "gone"
    if (map_job and map_job.deleting) or (reduce_job and reduce_job.deleting):
        return "cancelling"
    if reduce_job is not None and reduce_job.finished == "Failed":
        return "failed"
    if reduce_job is not None and reduce_job.finished == "Complete":
        return "complete" if map_job is None or map_job.finished == "Complete" else "partial"
    if map_job is not None and map_job.suspended:
        return "queued"
    if map_job is not None and map_job.finished:
        return "reducing"
    return "running" if map_job is not None else "reducing"


@dataclass
class RunStatus:
    """A run as the cluster and its storage see it."""

    run_id: str
    namespace: str
    state: str
    map_job: JobState | None = None
    reduce_job: JobState | None = None
    pipeline: str | None = None
    run_uri: str | None = None
    rows: int | None = None
    shards: int | None = None
    progress: Any = None
    shards_done: list[int] = field(default_factory=list)
    summary: dict | None = None
    storage_error: str | None = None

    def to_dict(self) -> dict:
        """Return a JSON-able form (``dfk8s status --json``)."""
        out = dataclasses.asdict(self)
        out["map_job"] = dataclasses.asdict(self.map_job) if self.map_job else None
        out["reduce_job"] = dataclasses.asdict(self.reduce_job) if self.reduce_job else None
        out["progress"] = dataclasses.asdict(self.progress) if self.progress else None
        return out


def _run_uri_from_job(job: dict) -> str | None:
    for container in job.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
        argv = list(container.get("command") or []) + list(container.get("args") or [])
        if "--run" in argv[:-1]:
            return argv[argv.index("--run") + 1]
    return None


def _endpoint_from_job(job: dict) -> str | None:
    for container in job.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
        for item in container.get("env") or ():
            if item.get("name") == "AWS_ENDPOINT_URL" and "value" in item:
                return item["value"]
    return None


def run_status(
    clients,
    namespace: str,
    run_id: str,
    *,
    output: str | None = None,
    endpoint_url: str | None = None,
    reader=None,
) -> RunStatus:
    """Read a run's Jobs and its progress on storage.

    Args:
        clients: :class:`dfk8s.kube.client.KubeClients`.
        namespace: Where the Jobs are.
        run_id: The run.
        output: ``s3://bucket/prefix`` the run is under; default: read from the map Job.
        endpoint_url: S3 endpoint from here; default: the one the Jobs use.
        reader: A :class:`dfk8s.progress.ProgressReader` to reuse between polls.

    Raises:
        KubernetesError: "run not found" when neither Jobs nor (with ``output``) storage know it.

    """
    from dfk8s.kube.client import find_run_jobs, to_dict
    from dfk8s.spec import RunSpec
    from dfk8s.storage import open_storage

    jobs = find_run_jobs(clients, namespace, run_id)
    map_raw, reduce_raw = jobs.get("map"), jobs.get("reduce")
    status = RunStatus(
        run_id=run_id,
        namespace=namespace,
        state="gone",
        map_job=job_state(to_dict(clients.api, map_raw)) if map_raw else None,
        reduce_job=job_state(to_dict(clients.api, reduce_raw)) if reduce_raw else None,
    )
    status.state = run_state(status.map_job, status.reduce_job)
    any_job = to_dict(clients.api, map_raw or reduce_raw) if (map_raw or reduce_raw) else {}
    status.pipeline = (any_job.get("metadata", {}).get("labels") or {}).get("dfk8s.io/pipeline")
    if reader is not None:
        status.run_uri = reader.storage.url()
    elif output:
        status.run_uri = f"{output.rstrip('/')}/{run_id}"
    else:
        status.run_uri = _run_uri_from_job(any_job) if any_job else None
    if status.run_uri is None:
        raise KubernetesError(
            f"run not found: no Jobs of run {run_id} in namespace {namespace} (pass --output "
            "s3://... to read a run whose Jobs are gone)"
        )
    endpoint = endpoint_url or (_endpoint_from_job(any_job) if any_job else None)
    try:
        storage = (
            reader.storage if reader is not None else open_storage(status.run_uri, endpoint_url=endpoint)
        )
        spec = RunSpec.load(storage)
        status.pipeline, status.rows, status.shards = spec.pipeline, spec.rows, spec.shards
        if reader is None:
            from dfk8s.progress import ProgressReader

            reader = ProgressReader(storage)
        status.progress = reader.poll()
        status.shards_done = sorted(reader.done_shards())
        try:
            status.summary = storage.read_json(layout.SUMMARY_KEY)
        except NotFound:
            pass
        if status.state == "gone" and status.summary:  # the Jobs expired (TTL) or were deleted after the end
            status.state = "complete" if status.summary.get("complete") else "partial"
    except (StorageError, SpecError) as exc:
        if not any_job:
            raise KubernetesError(f"run not found: {exc}") from None
        status.storage_error = str(exc)
    except Exception as exc:  # storage unreachable from here (e.g. an in-cluster endpoint): still report Jobs
        status.storage_error = f"{type(exc).__name__}: {exc}"
    return status


def cancel_run(clients, namespace: str, run_id: str) -> tuple[list[str], list[str], str | None]:
    """Delete a run's Jobs and pods; returns the Jobs and pods deleted and where its data stays."""
    from dfk8s.kube.client import delete_run, find_run_jobs, to_dict

    jobs = find_run_jobs(clients, namespace, run_id)
    any_job = next(iter(jobs.values()), None)
    run_uri = _run_uri_from_job(to_dict(clients.api, jobs.get("map") or any_job)) if any_job else None
    deleted_jobs, deleted_pods = delete_run(clients, namespace, run_id, jobs)
    return deleted_jobs, deleted_pods, run_uri


@dataclass
class RunRow:
    """One line of ``dfk8s list``."""

    run_id: str
    pipeline: str
    state: str
    shards: int
    completed: int
    failed: list[int]
    created: str


def list_runs(clients, namespace: str) -> list[RunRow]:
    """List the runs in a namespace, from their Jobs' labels, newest first."""
    from dfk8s.kube.client import RUN_LABEL, list_dfk8s_jobs

    by_run: dict[str, dict[str, dict]] = {}
    for job in list_dfk8s_jobs(clients, namespace):
        labels = job["metadata"].get("labels") or {}
        run_id = labels.get(RUN_LABEL)
        if run_id:
            by_run.setdefault(run_id, {})[labels.get("dfk8s.io/component", "map")] = job
    rows = []
    for run_id, jobs in by_run.items():
        map_raw, reduce_raw = jobs.get("map"), jobs.get("reduce")
        map_job = job_state(map_raw) if map_raw else None
        reduce_job = job_state(reduce_raw) if reduce_raw else None
        first = map_raw or reduce_raw
        rows.append(
            RunRow(
                run_id=run_id,
                pipeline=(first["metadata"].get("labels") or {}).get("dfk8s.io/pipeline", ""),
                state=run_state(map_job, reduce_job),
                shards=map_job.completions if map_job else 0,
                completed=len(map_job.completed) if map_job else 0,
                failed=map_job.failed_indexes if map_job else [],
                created=first["metadata"].get("creationTimestamp") or "",
            )
        )
    return sorted(rows, key=lambda row: (row.created, row.run_id), reverse=True)


# ----- following a run --------------------------------------------------------------------------


class StoppedWaiting(Dfk8sError):
    """The user stopped ``--wait``; the run goes on in the cluster."""

    exit_code = 130


def follow_run(
    clients,
    submission: Submission,
    *,
    poll_seconds: float = 2.0,
    show_progress: bool = True,
    echo: Callable[[str], None] = print,
) -> RunStatus:
    """Show progress (from storage) and the Jobs' state until the reduce Job ends; return the last status.

    Raises:
        StoppedWaiting: Ctrl-C (the Jobs keep running).

    """
    from dfk8s.progress import ProgressReader, progress_bar

    reader = ProgressReader(submission.storage)
    total = submission.spec.rows
    last_line = None
    try:
        with progress_bar(total, enabled=show_progress) as bar:
            task = bar.add_task(submission.run_id, total=total, completed=0, failed=0, rate="-")
            started, first_rows = time.monotonic(), None
            while True:
                try:
                    status = run_status(clients, submission.namespace, submission.run_id, reader=reader)
                except KubernetesError as exc:
                    if getattr(exc, "status", None) in (401, 403, 404, 409, 422):
                        raise
                    echo(f"{exc}; trying again")  # a blip of the API (or of the network) ends nothing
                    time.sleep(poll_seconds)
                    continue
                if status.progress is not None:
                    first_rows = status.progress.rows if first_rows is None else first_rows
                    rate = (status.progress.rows - first_rows) / max(1e-6, time.monotonic() - started)
                    bar.update(
                        task,
                        completed=status.progress.rows,
                        failed=status.progress.failed,
                        rate=f"{rate:,.1f}",
                    )
                line = _jobs_line(status)
                if line != last_line:
                    echo(line)
                    last_line = line
                if status.state in ("complete", "partial", "failed", "gone", "cancelling"):
                    return status
                time.sleep(poll_seconds)
    except KeyboardInterrupt:
        raise StoppedWaiting(
            f"stopped waiting; run {submission.run_id} goes on in the cluster: "
            f"dfk8s status {submission.run_id} -n {submission.namespace}"
        ) from None


def _jobs_line(status: RunStatus) -> str:
    parts = [f"{status.state}"]
    if status.map_job:
        parts.append(f"map: {status.map_job.describe()}")
    if status.reduce_job:
        parts.append(f"reduce: {status.reduce_job.describe()}")
    return "; ".join(parts)
