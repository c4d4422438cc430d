"""Build the Kubernetes objects of one run (the map Job and the reduce Job) as plain dicts.

Pure functions: nothing here talks to a cluster, so the objects can be printed (``--dry-run``),
validated against the API schemas in tests, or applied by the Kubernetes executor.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from dfk8s.errors import EXIT_DO_NOT_RETRY, SpecError
from dfk8s.kube._cluster_options import ClusterOptions
from dfk8s.kube.profiles import GPU_RESOURCE, Profile, load_profile
from dfk8s.servings import SERVINGS
from dfk8s.servings.flux_speed import CACHE_ENV as COMPILE_CACHE_ENV
from dfk8s.servings.self_hosted import ENGINE_GPUS_ENV, ENGINE_URL_ENV, SIDECAR_PORT

__all__ = [
    "KubeRunConfig",
    "build_map_job",
    "build_reduce_job",
    "build_run_objects",
    "map_job_name",
    "max_run_id_length",
    "reduce_job_name",
    "run_labels",
    "to_yaml",
]

WORKER_CONTAINER = "worker"
#: The engine sidecar of a self-hosted serving (vllm, transformers).
ENGINE_CONTAINER = "engine"
REDUCER_CONTAINER = "reducer"
RUN_AS_USER = 10001
TMP_PATH = "/tmp"
CACHE_PATH = "/cache"
HF_HOME = f"{CACHE_PATH}/huggingface"
#: FLUX's compile cache on the model-cache claim (compiled once per cluster): the folder inside the claim
#: (beside huggingface/), and where FLUX pods mount it writable.
COMPILE_CACHE_FOLDER = "dfk8s-compile"
COMPILE_CACHE_PATH = "/compile-cache"
SHM_PATH = "/dev/shm"

# Job names end up in the `batch.kubernetes.io/job-name` pod label, limited to 63 characters, so the
# run id may use what is left after "dfk8s-" and the longest suffix "-reduce".
_MAX_RUN_ID = 63 - len("dfk8s-") - len("-reduce")
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Indexed Jobs with backoffLimitPerIndex accept at most 10^5 completions.
_MAX_SHARDS = 100_000
# Env names that hold credentials: extra_env is written into the Job in clear text, so these must
# come through a Secret reference instead.
_SECRET_NAME_HINTS = (
    "SECRET",
    "TOKEN",
    "PASSWORD",
    "PASSWD",
    "API_KEY",
    "APIKEY",
    "CREDENTIAL",
    "AWS_ACCESS_KEY_ID",
)


@dataclass(frozen=True, kw_only=True)
class KubeRunConfig(ClusterOptions):
    """Everything the map and reduce Jobs of one run are built from: the cluster flags, and the run.

    Attributes:
        run_id: the run's id; lowercase letters, digits and '-', at most 50 characters.
        pipeline: pipeline name; must match ``profile.pipeline``.
        serving: serving name; must match ``profile.serving``.
        run_uri: where the run lives, ``s3://bucket/prefix/<run_id>``.
        shards: number of shards, the map Job's ``completions``.
        parallelism: worker pods running at once (capped at ``shards``).
        namespace: namespace of both Jobs.
        profile: the job profile of the pipeline and serving.
        image: worker image; None for ``profile.image``.
        reducer_image: reducer image; None for the worker image. The reducer needs no GPU build, so
            a CPU image here spares a multi-GB pull.
        cluster_s3_endpoint: the S3 endpoint the pods use when it differs from this machine's.
        s3_endpoint: S3 endpoint URL for non-AWS stores (set as ``AWS_ENDPOINT_URL``).
        queue: Kueue LocalQueue name; the map Job is then created suspended for Kueue to admit.
        api_key_secret: ``(secret name, key)`` holding the serving's API key.
        api_key_env: env var the worker reads the API key from.
        s3_secret: name of a Secret with keys ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY``.
        hf_token_secret: ``(secret name, key)`` holding a Hugging Face token (gated models).
        gpus: GPUs per worker pod; None for the profile's. 0 runs a GPU profile on CPU nodes.
        node_selector: replaces the profile's node selector when not None.
        tolerations: replace the profile's tolerations when not None.
        service_account: ServiceAccount of the reducer (it reads the map Job); workers get none.
        backoff_limit_per_index: retries of one shard before its index is marked failed.
        max_failed_indexes: failed shards before the whole Job fails; None for ``shards`` (the Job
            keeps going and the reducer reports the failed shards).
        ttl_seconds_after_finished: how long finished Jobs (and their pod logs) stay around.
        extra_env: non-secret env vars for the workers, e.g. ``DF_BASE_URL``.
        model_cache_pvc: an existing PersistentVolumeClaim holding the model cache (replaces the
            profile's cache volume); workers mount it read-only and load with ``HF_HUB_OFFLINE=1``.
        model_cache_subpath: folder inside that claim to mount (``subPath``).
        engine_options: the run's serving options, for a profile with an engine sidecar (its model,
            ``max_model_len``, ``engine_args``, ...); None before the run is planned.

    """

    run_id: str
    pipeline: str
    serving: str
    run_uri: str
    shards: int
    profile: Profile
    s3_endpoint: str | None = None
    api_key_env: str = "DF_API_KEY"
    ttl_seconds_after_finished: int = 86400
    extra_env: Mapping[str, str] = field(default_factory=dict)
    engine_options: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def worker_image(self) -> str:
        """The image the worker pods run."""
        return self.image or self.profile.image

    @property
    def model_cache_claim(self) -> tuple[str, str | None] | None:
        """``(claim name, subPath or None)`` of a shared model cache (flag or profile), else None."""
        if self.model_cache_pvc:
            return self.model_cache_pvc, self.model_cache_subpath
        cache = self.profile.model_cache
        if cache is not None and cache.pvc:
            return cache.pvc, self.model_cache_subpath or cache.subpath
        return None

    @property
    def gpu_count(self) -> int:
        """GPUs per worker pod after the ``gpus`` override."""
        return self.profile.gpu_count if self.gpus is None else self.gpus


def kube_run_config(
    options: ClusterOptions,
    profile: Profile,
    *,
    run_id: str,
    run_uri: str,
    shards: int,
    api_mode: str | None = None,
    endpoint_url: str | None = None,
    serving_options: Mapping[str, Any] | None = None,
) -> KubeRunConfig:
    """Build the :class:`KubeRunConfig` of a run (validates names, secrets, GPUs, shards).

    Args:
        options: The cluster flags.
        profile: The run's job profile.
        run_id: The run.
        run_uri: Where the pods find it.
        shards: The map Job's completions.
        api_mode: The run's ``api_mode`` option (batch mode gets the profile's small pod).
        endpoint_url: The S3 endpoint of this machine (the pods' unless ``--cluster-s3-endpoint``).
        serving_options: The run's serving options (an engine sidecar is built from them).

    """
    cluster = {f.name: getattr(options, f.name) for f in dataclasses.fields(ClusterOptions)}
    return KubeRunConfig(
        **{**cluster, "reducer_image": options.reducer_image or (cpu_image() if profile.gpu else None)},
        run_id=run_id,
        pipeline=profile.pipeline,
        serving=profile.serving,
        run_uri=run_uri,
        shards=shards,
        profile=profile.for_api_mode(api_mode),  # batch mode: a small pod
        s3_endpoint=options.cluster_s3_endpoint or endpoint_url,
        engine_options=dict(serving_options) if serving_options is not None else None,
    )


def cpu_image() -> str:
    """The CPU image of this version (from the caption profile): what reducers run, even for FLUX runs."""
    return load_profile("caption").image


def map_job_name(run_id: str) -> str:
    """Return the name of the map Job of a run."""
    return f"dfk8s-{run_id}-map"


def reduce_job_name(run_id: str) -> str:
    """Return the name of the reduce Job of a run."""
    return f"dfk8s-{run_id}-reduce"


def run_labels(cfg: KubeRunConfig, component: str) -> dict[str, str]:
    """Return the labels every object of a run carries (``dfk8s status/logs/cancel`` select on them).

    Args:
        cfg: the run.
        component: ``map`` or ``reduce``.

    Returns:
        The label mapping.

    """
    return {
        "app.kubernetes.io/name": "dfk8s",
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "dfk8s",
        "dfk8s.io/run": cfg.run_id,
        "dfk8s.io/pipeline": cfg.pipeline,
        "dfk8s.io/serving": cfg.serving,
        "dfk8s.io/component": component,
    }


def build_map_job(cfg: KubeRunConfig) -> dict[str, Any]:
    """Build the Indexed Job that runs one worker pod per shard.

    Args:
        cfg: the run.

    Returns:
        A ``batch/v1`` Job as a plain dict.

    """
    labels = run_labels(cfg, "map")
    job_labels = dict(labels)
    if cfg.queue:
        job_labels["kueue.x-k8s.io/queue-name"] = cfg.queue

    volumes, mounts = _worker_volumes(cfg)
    container = {
        "name": WORKER_CONTAINER,
        "image": cfg.worker_image,
        "imagePullPolicy": "IfNotPresent",
        # The worker reads its shard index from JOB_COMPLETION_INDEX, which the Job controller sets.
        "command": ["dfk8s", "worker", "--run", cfg.run_uri],
        "env": _worker_env(cfg),
        "resources": _worker_resources(cfg),
        "securityContext": _container_security(),
        "volumeMounts": mounts,
    }
    engine = _engine_sidecar(cfg, mounts)
    if engine is not None:
        container["env"] = [*container["env"],
                            {"name": ENGINE_URL_ENV, "value": f"http://127.0.0.1:{SIDECAR_PORT}/v1"},
                            {"name": ENGINE_GPUS_ENV, "value": str(cfg.gpu_count)}]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # Workers only talk to storage and the serving; a token would be a credential for nothing.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _pod_security(),
        "containers": [container],
        "volumes": volumes,
    }
    if engine is not None:
        pod_spec["initContainers"] = [engine]
    node_selector, tolerations = _scheduling(cfg)
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if tolerations:
        pod_spec["tolerations"] = tolerations

    spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": cfg.shards,
        "parallelism": min(cfg.parallelism, cfg.shards),
        "backoffLimitPerIndex": cfg.backoff_limit_per_index,
        "maxFailedIndexes": cfg.shards if cfg.max_failed_indexes is None else cfg.max_failed_indexes,
        "podFailurePolicy": {
            "rules": [
                # Preemption, node drain or eviction is not the shard's fault: retry without
                # spending its backoff budget.
                {
                    "action": "Ignore",
                    "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                },
                # Exit 42: the shard can never succeed (bad spec, bad shard, missing credentials).
                {
                    "action": "FailIndex",
                    "onExitCodes": {
                        "containerName": WORKER_CONTAINER,
                        "operator": "In",
                        "values": [EXIT_DO_NOT_RETRY],
                    },
                },
            ]
        },
        "ttlSecondsAfterFinished": cfg.ttl_seconds_after_finished,
        "template": {"metadata": {"labels": labels}, "spec": pod_spec},
    }
    if cfg.queue:
        # Kueue admits a Job by unsuspending it; created unsuspended, it would start outside quota.
        spec = {"suspend": True, **spec}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": map_job_name(cfg.run_id), "namespace": cfg.namespace, "labels": job_labels},
        "spec": spec,
    }


def build_reduce_job(cfg: KubeRunConfig) -> dict[str, Any]:
    """Build the Job that waits for the map Job to end, then writes the run's result.

    It is not put in the Kueue queue: admitted ahead of the map Job it would hold quota while
    waiting for a Job that may then not fit, and it needs next to nothing.

    Args:
        cfg: the run.

    Returns:
        A ``batch/v1`` Job as a plain dict.

    """
    labels = run_labels(cfg, "reduce")
    env = _common_env(cfg)
    container = {
        "name": REDUCER_CONTAINER,
        "image": cfg.reducer_image or cfg.worker_image,
        "imagePullPolicy": "IfNotPresent",
        "command": [
            "dfk8s",
            "reduce",
            cfg.run_uri,
            "--wait-job",
            map_job_name(cfg.run_id),
            "--namespace",
            cfg.namespace,
        ],
        "env": env,
        # The reducer streams shard outputs into result.jsonl; it never holds a whole run in memory.
        "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "tmp", "mountPath": TMP_PATH}],
    }
    pod_spec: dict[str, Any] = {"restartPolicy": "Never"}
    if cfg.service_account:
        pod_spec["serviceAccountName"] = cfg.service_account
    pod_spec.update(
        {
            # The reducer watches the map Job through the API, so it needs its token.
            "automountServiceAccountToken": True,
            "enableServiceLinks": False,
            "securityContext": _pod_security(),
            "containers": [container],
            "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}],
        }
    )
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": reduce_job_name(cfg.run_id),
            "namespace": cfg.namespace,
            "labels": dict(labels),
        },
        "spec": {
            "backoffLimit": 3,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "Ignore",
                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                    },
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": REDUCER_CONTAINER,
                            "operator": "In",
                            "values": [EXIT_DO_NOT_RETRY],
                        },
                    },
                ]
            },
            "ttlSecondsAfterFinished": cfg.ttl_seconds_after_finished,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def build_run_objects(cfg: KubeRunConfig) -> list[dict[str, Any]]:
    """Build all objects of a run, in the order to apply them (map, then reduce).

    Args:
        cfg: the run.

    Returns:
        The map Job and the reduce Job.

    """
    return [build_map_job(cfg), build_reduce_job(cfg)]


def to_yaml(objects: list[dict[str, Any]]) -> str:
    """Serialise objects as one multi-document YAML stream for ``kubectl apply -f -``.

    Args:
        objects: Kubernetes objects as plain dicts.

    Returns:
        The YAML text, one ``---``-separated document per object, keys in build order.

    """
    return yaml.dump_all(
        objects, Dumper=_PlainDumper, sort_keys=False, explicit_start=True, default_flow_style=False
    )


class _PlainDumper(yaml.SafeDumper):
    """A safe dumper that writes shared sub-objects out in full, never as anchors (``&id001``)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def max_run_id_length(shards: int) -> int:
    """The longest run id whose Jobs and pods Kubernetes accepts for a run of ``shards`` shards.

    Job names go into a 63-character label, and each pod of an Indexed Job gets the hostname
    ``<job name>-<index>``, a DNS label of at most 63 characters: the API server refuses a Job whose
    last index would not fit ("will not able to create pod with invalid DNS label").
    """
    hostname_room = 63 - len(map_job_name("")) - len("-") - len(str(max(shards - 1, 0)))
    return min(_MAX_RUN_ID, hostname_room)


def _validate(cfg: KubeRunConfig) -> None:
    if not _DNS_LABEL_RE.match(cfg.run_id) or len(cfg.run_id) > _MAX_RUN_ID:
        raise SpecError(
            f"run id {cfg.run_id!r} cannot name a Kubernetes Job: use at most {_MAX_RUN_ID} lowercase "
            "letters, digits and '-', starting and ending with a letter or digit"
        )
    if 1 <= cfg.shards <= _MAX_SHARDS and len(cfg.run_id) > max_run_id_length(cfg.shards):
        longest = max_run_id_length(cfg.shards)
        raise SpecError(
            f"run id {cfg.run_id!r} ({len(cfg.run_id)} characters) is too long for {cfg.shards} shards: "
            f"the pod hostnames {map_job_name(cfg.run_id)}-<index> must fit in 63 characters; use a run id "
            f"of at most {longest} characters (or fewer shards)"
        )
    if (cfg.pipeline, cfg.serving) != (cfg.profile.pipeline, cfg.profile.serving):
        raise SpecError(
            f"profile is for {cfg.profile.pipeline}/{cfg.profile.serving}, not {cfg.pipeline}/{cfg.serving}"
        )
    if not cfg.run_uri.startswith("s3://"):
        raise SpecError(f"a cluster run needs S3 storage (s3://bucket/prefix), got {cfg.run_uri!r}")
    if not 1 <= cfg.shards <= _MAX_SHARDS:
        raise SpecError(f"shards must be between 1 and {_MAX_SHARDS}, got {cfg.shards}")
    if cfg.parallelism < 1:
        raise SpecError(f"parallelism must be at least 1, got {cfg.parallelism}")
    if not _DNS_LABEL_RE.match(cfg.namespace):
        raise SpecError(f"invalid namespace {cfg.namespace!r}")
    if cfg.backoff_limit_per_index < 0:
        raise SpecError(f"backoff_limit_per_index must be >= 0, got {cfg.backoff_limit_per_index}")
    if cfg.max_failed_indexes is not None and not 0 <= cfg.max_failed_indexes <= cfg.shards:
        raise SpecError(f"max_failed_indexes must be between 0 and shards ({cfg.shards})")
    if cfg.ttl_seconds_after_finished < 0:
        raise SpecError("ttl_seconds_after_finished must be >= 0")
    if cfg.gpus is not None and cfg.gpus < 0:
        raise SpecError(f"gpus must be >= 0, got {cfg.gpus}")
    if cfg.gpus and not cfg.profile.gpu:
        raise SpecError(
            f"serving {cfg.serving!r} of pipeline {cfg.pipeline!r} runs on CPU; it cannot use --gpus"
        )
    for what, secret in (("api_key_secret", cfg.api_key_secret), ("hf_token_secret", cfg.hf_token_secret)):
        # The message never echoes the value: a caller who got this wrong may have passed the secret.
        if secret is not None and (
            len(secret) != 2 or not all(isinstance(part, str) and part for part in secret)
        ):
            raise SpecError(f"{what} must be a secret reference (secret name, key), not a value")
    _validate_model_cache(cfg)
    if not _ENV_NAME_RE.match(cfg.api_key_env):
        raise SpecError(f"invalid env var name {cfg.api_key_env!r}")
    reserved = {name for name, _ in _common_env_pairs(cfg)} | {
        cfg.api_key_env,
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "HF_TOKEN",
        "HF_HOME",
        "HF_HUB_OFFLINE",
        "JOB_COMPLETION_INDEX",
    }
    for name in cfg.extra_env:
        if not _ENV_NAME_RE.match(name):
            raise SpecError(f"invalid env var name {name!r}")
        if name in reserved:
            raise SpecError(f"env var {name} is set by dfk8s; it cannot be passed as extra env")
        if any(hint in name.upper() for hint in _SECRET_NAME_HINTS):
            raise SpecError(
                f"env var {name} looks like a credential; pass it through a Kubernetes Secret, "
                "not as a plain value"
            )


_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")


def check_claim(name: str, subpath: str | None, what: str = "--model-cache-pvc") -> None:
    """Refuse a claim name or subPath Kubernetes would reject (one line, naming the flag).

    Raises:
        SpecError: Not a DNS subdomain name, or a subPath that is absolute or climbs out with ``..``.

    """
    if not _DNS_SUBDOMAIN_RE.match(name):
        raise SpecError(
            f"{what} {name!r} is not a PersistentVolumeClaim name (lowercase letters, digits, '-', '.')"
        )
    if subpath is not None and (not subpath or subpath.startswith("/") or ".." in subpath.split("/")):
        raise SpecError(
            f"subpath {subpath!r} must be a relative folder inside the claim (no leading '/', no '..')"
        )


def _validate_model_cache(cfg: KubeRunConfig) -> None:
    if cfg.model_cache_subpath is not None and cfg.model_cache_claim is None:
        raise SpecError("--model-cache-subpath needs --model-cache-pvc (or a profile with model_cache.pvc)")
    if cfg.model_cache_pvc and cfg.profile.model_cache is None:
        raise SpecError(
            f"serving {cfg.serving!r} of pipeline {cfg.pipeline!r} loads no model from the Hub: "
            "--model-cache-pvc is for the diffusers serving"
        )
    claim = cfg.model_cache_claim
    if claim is not None:
        check_claim(*claim)


def _common_env_pairs(cfg: KubeRunConfig) -> list[tuple[str, str]]:
    pairs = [("DFK8S_LOG_FORMAT", "json"), ("HOME", TMP_PATH)]
    if cfg.s3_endpoint:
        pairs.append(("AWS_ENDPOINT_URL", cfg.s3_endpoint))
    return pairs


def _common_env(cfg: KubeRunConfig) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": name, "value": value} for name, value in _common_env_pairs(cfg)]
    if cfg.s3_secret:
        env += [
            _secret_env("AWS_ACCESS_KEY_ID", cfg.s3_secret, "AWS_ACCESS_KEY_ID"),
            _secret_env("AWS_SECRET_ACCESS_KEY", cfg.s3_secret, "AWS_SECRET_ACCESS_KEY"),
        ]
    return env


def _worker_env(cfg: KubeRunConfig) -> list[dict[str, Any]]:
    env = _common_env(cfg)
    # Without a cache volume HF_HOME stays unset: the libraries then fall back to $HOME/.cache, which
    # is on the writable /tmp (HOME) instead of the read-only root filesystem.
    if cfg.profile.model_cache is not None:
        env.append({"name": "HF_HOME", "value": HF_HOME})
    if cfg.model_cache_claim is not None:
        # The shared cache is read-only and filled by `dfk8s model pull --pvc`: a model missing from it
        # must fail the shard at once (exit 42), not start a download per pod.
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
        if _compiles(cfg):  # FLUX compiled once per cluster (dfk8s/servings/flux_speed.py)
            env.append({"name": COMPILE_CACHE_ENV, "value": COMPILE_CACHE_PATH})
    env += [{"name": name, "value": str(value)} for name, value in cfg.extra_env.items()]
    if cfg.api_key_secret:
        env.append(_secret_env(cfg.api_key_env, *cfg.api_key_secret))
    if cfg.hf_token_secret:
        env.append(_secret_env("HF_TOKEN", *cfg.hf_token_secret))
    return env


def _engine_sidecar(cfg: KubeRunConfig, mounts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The engine of a self-hosted serving as a native sidecar, or None.

    An init container with ``restartPolicy: Always`` (Kubernetes 1.29+): it starts before the worker,
    which starts only once the startup probe passes; it holds the GPUs; when the worker exits, the
    kubelet stops it and the pod (and the Job's index) completes. The command follows vLLM's documented
    CLI (``vllm serve``; vLLM cannot run where dfk8s is built) or ``transformers serve``.
    """
    profile = cfg.profile
    if profile.engine is None:
        return None
    from dfk8s.servings.self_hosted import IMAGES_PER_PROMPT, EngineConfig

    options = dict(profile.defaults)
    options.update({k: v for k, v in (cfg.engine_options or {}).items() if v is not None})
    model = options.get("model")
    if not model:
        raise SpecError(f"serving {cfg.serving} needs --model (a Hub id in the model cache)")
    config = EngineConfig(engine=cfg.serving, model=str(model), gpus=cfg.gpu_count or None,
                          max_model_len=options.get("max_model_len"),
                          gpu_memory_utilization=options.get("gpu_memory_utilization"),
                          images_per_prompt=IMAGES_PER_PROMPT.get(cfg.pipeline, 1),
                          engine_args=tuple(options.get("engine_args") or ()))
    command = config.command(host="127.0.0.1", port=SIDECAR_PORT)
    if cfg.serving == "transformers":
        command[0] = "transformers"  # the image's console script, not this machine's path
    resources = {section: dict(amounts) for section, amounts in profile.engine.resources.items()}
    resources.setdefault("limits", {}).pop(GPU_RESOURCE, None)
    resources.get("requests", {}).pop(GPU_RESOURCE, None)
    if cfg.gpu_count:
        resources["limits"][GPU_RESOURCE] = str(cfg.gpu_count)
    timeout = float(options.get("engine_timeout") or 900)
    env = [{"name": name, "value": value} for name, value in _common_env_pairs(cfg)
           if name != "DFK8S_LOG_FORMAT"]
    if cfg.model_cache_claim is not None or profile.model_cache is not None:
        env.append({"name": "HF_HOME", "value": HF_HOME})
    if cfg.model_cache_claim is not None:
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})  # the weights come from the cache, read-only
    if cfg.hf_token_secret:
        env.append(_secret_env("HF_TOKEN", *cfg.hf_token_secret))
    return {
        "name": ENGINE_CONTAINER,
        "image": profile.engine.image,
        "imagePullPolicy": "IfNotPresent",
        "restartPolicy": "Always",
        "command": command,
        "env": env,
        "ports": [{"name": "engine", "containerPort": SIDECAR_PORT}],
        # The worker starts once this passes: weights loaded, warmed up (--engine-timeout in all). The
        # engine listens on the pod's loopback only (it has no authentication), where an httpGet probe,
        # sent to the pod IP, cannot reach: the probe runs in the container, with its own Python.
        "startupProbe": {"exec": {"command": health_probe_command(SIDECAR_PORT)}, "periodSeconds": 5,
                         "timeoutSeconds": 4, "failureThreshold": max(1, int(timeout // 5))},
        "resources": {section: amounts for section, amounts in resources.items() if amounts},
        "securityContext": _container_security(),
        "volumeMounts": [dict(m) for m in mounts],
    }


def health_probe_command(port: int) -> list[str]:
    """A probe command that succeeds when the engine on the pod's loopback answers ``/health`` with 200."""
    return ["python3", "-c", "import urllib.request as u; "
            f"u.urlopen('http://127.0.0.1:{port}/health', timeout=3).read()"]


def _secret_env(env_name: str, secret_name: str, key: str) -> dict[str, Any]:
    return {"name": env_name, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": key}}}


def _worker_resources(cfg: KubeRunConfig) -> dict[str, dict[str, str]]:
    resources = {section: dict(amounts) for section, amounts in cfg.profile.resources.items()}
    limits = resources.setdefault("limits", {})
    requests = resources.get("requests", {})
    # Extended resources cannot be overcommitted: a GPU request, if any, must equal the limit, so the
    # count lives in the limit only (Kubernetes copies it to the request).
    requests.pop(GPU_RESOURCE, None)
    limits.pop(GPU_RESOURCE, None)
    if cfg.gpu_count and cfg.profile.engine is None:  # with an engine sidecar, it holds the GPUs
        limits[GPU_RESOURCE] = str(cfg.gpu_count)
    return {section: amounts for section, amounts in resources.items() if amounts}


def _scheduling(cfg: KubeRunConfig) -> tuple[dict[str, str], list[dict[str, Any]]]:
    profile = cfg.profile
    # A GPU profile run with gpus=0 must not be pinned to (or tolerate) GPU nodes it will not use.
    uses_profile_gpu_scheduling = not profile.gpu or cfg.gpu_count > 0
    node_selector = (
        dict(cfg.node_selector)
        if cfg.node_selector is not None
        else (dict(profile.node_selector) if uses_profile_gpu_scheduling else {})
    )
    tolerations = (
        [dict(t) for t in cfg.tolerations]
        if cfg.tolerations is not None
        else ([dict(t) for t in profile.tolerations] if uses_profile_gpu_scheduling else [])
    )
    return node_selector, tolerations


def _worker_volumes(cfg: KubeRunConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    # The root filesystem is read-only: everything that writes gets an emptyDir.
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {"sizeLimit": "10Gi"}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": TMP_PATH}]
    profile = cfg.profile
    if profile.shm_size:
        # PyTorch uses /dev/shm for inter-process tensors; the runtime default of 64 MiB is too small.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": profile.shm_size}})
        mounts.append({"name": "dshm", "mountPath": SHM_PATH})
    claim = cfg.model_cache_claim
    if claim is not None:
        compiles = _compiles(cfg)
        # One volume for the claim, mounted twice for FLUX: the models read-only, the compile cache's
        # folder writable. (Two volumes of one claim in a pod never finish mounting on Kubernetes 1.33.)
        volumes.append({"name": "model-cache", **model_cache_volume(claim[0], read_only=not compiles)})
        mounts.append(model_cache_mount(claim[1], read_only=True))
        if compiles:
            mounts.append({"name": "model-cache", "mountPath": COMPILE_CACHE_PATH,
                           "subPath": "/".join(filter(None, (claim[1], COMPILE_CACHE_FOLDER)))})
    elif profile.model_cache is not None:
        volumes.append({"name": "model-cache", "emptyDir": {"sizeLimit": profile.model_cache.size}})
        mounts.append({"name": "model-cache", "mountPath": CACHE_PATH})
    return volumes, mounts


def _compiles(cfg: KubeRunConfig) -> bool:
    """Whether the run's workers share compiled artifacts through the compile cache (FLUX)."""
    info = SERVINGS.get(cfg.serving)
    return bool(info and info.compiles)


def model_cache_volume(claim: str, *, read_only: bool) -> dict[str, Any]:
    """The ``persistentVolumeClaim`` source of the shared model cache (without the volume's name)."""
    source: dict[str, Any] = {"claimName": claim}
    if read_only:
        source["readOnly"] = True
    return {"persistentVolumeClaim": source}


def model_cache_mount(subpath: str | None, *, read_only: bool) -> dict[str, Any]:
    """The mount of the shared model cache at ``/cache`` (``HF_HOME`` is ``/cache/huggingface``)."""
    mount: dict[str, Any] = {"name": "model-cache", "mountPath": CACHE_PATH}
    if subpath:
        mount["subPath"] = subpath
    if read_only:
        mount["readOnly"] = True
    return mount


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        # fsGroup makes emptyDir and PVC volumes writable by the non-root user.
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
