"""The shared model cache on a cluster: the pull and list Jobs, and the warnings a submit gives.

A FLUX run with a per-pod emptyDir cache downloads the model once per pod (~34 GB each). With a
PersistentVolumeClaim the model is downloaded once, by ``dfk8s model pull MODEL --pvc NAME`` (a CPU-only
Job that runs ``dfk8s model pull MODEL --to /cache/huggingface`` with the claim mounted read-write),
and every worker mounts the claim read-only and loads offline (``--model-cache-pvc NAME``).

``dfk8s model list --pvc NAME`` needs to read the claim, which only a pod can: it runs a short Job that
mounts the claim read-only and prints the cache's contents as one JSON line
(:func:`dfk8s.models.hub.cached_models_to_json`), reads that line from the pod's log and deletes the Job. A
finished pull leaves a marker beside the cache, so the list tells a complete pull from an interrupted one.

The object builders here are pure (``--dry-run`` prints them; tests validate them); creating, waiting
for and reading the Jobs is :mod:`dfk8s.executors.kubernetes.model_jobs`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from typing import Any

from dfk8s.errors import EXIT_DO_NOT_RETRY, SpecError
from dfk8s.kube.manifests import (
    CACHE_PATH,
    COMPILE_CACHE_FOLDER,
    HF_HOME,
    KubeRunConfig,
    _container_security,
    _pod_security,
    check_claim,
    model_cache_mount,
    model_cache_volume,
)
from dfk8s.models.hub import KNOWN_MODEL_BYTES, format_bytes, is_gated, is_hub_name
from dfk8s.servings import serving_info
from dfk8s.servings.flux_speed import CACHE_ENV as COMPILE_CACHE_ENV

log = logging.getLogger(__name__)

__all__ = [
    "PULL_CONTAINER",
    "build_list_job",
    "build_pull_job",
    "merge_warnings",
    "model_cache_warnings",
    "pull_job_name",
]

PULL_CONTAINER = "pull"
LIST_CONTAINER = "list"
#: Pod label naming the model Job a pod belongs to (``dfk8s model pull --wait`` reads its log).
MODEL_JOB_LABEL = "dfk8s.io/model-job"


# ----- warnings at submit -----------------------------------------------------------------------


def model_cache_warnings(cfg: KubeRunConfig, model: str | None) -> list[str]:
    """One line per problem a submit's model download will have; empty when there is none.

    Args:
        cfg: The run's config (shards = pods over the whole run, GPUs, cache volume, token).
        model: The ``model`` serving option (a Hub name or a local folder); None for the serving's default.

    Returns:
        The warning lines.

    """
    info = serving_info(cfg.serving)
    if cfg.profile.model_cache is None or not info.gpu:
        return []
    if model is None:
        model = info.defaults_for(cfg.pipeline).get("model")
    if not model or not is_hub_name(model):
        return []  # a folder in the image or on a mounted volume: nothing is downloaded
    warnings = []
    shared = cfg.model_cache_claim is not None
    if not shared and cfg.gpu_count > 0 and cfg.shards > 1:
        known = KNOWN_MODEL_BYTES.get(model)
        size = f" (~{format_bytes(known)})" if known else ""
        total = f", ~{format_bytes(known * cfg.shards)} in all" if known else ""
        warnings.append(
            f"each of the {cfg.shards} GPU pods (one per shard) downloads {model}{size} into its own "
            f"emptyDir cache{total}: pull it once with `dfk8s model pull {model} --pvc NAME` and submit with "
            "--model-cache-pvc NAME"
        )
    if not shared and cfg.hf_token_secret is None and is_gated(model):
        warnings.append(
            f"{model} is a gated model and the pods get no Hugging Face token: every pod will fail to "
            "download it; pass --hf-token-secret NAME/KEY (a Secret with the token of an account that "
            f"accepted its licence), or pull it once (`dfk8s model pull {model} --pvc NAME "
            "--hf-token-secret NAME/KEY`) and submit with --model-cache-pvc NAME"
        )
    return warnings


def merge_warnings(
    credential_warnings: list[str], model_warnings: list[str], cfg: KubeRunConfig
) -> list[str]:
    """A submit's warnings: check_credentials' generic token line is dropped where it is not true or new.

    With a shared cache the pods load offline and need no token; a gated model's own line says more.
    """
    from dfk8s.kube import HF_TOKEN_WARNING

    redundant = cfg.model_cache_claim is not None or any("gated model" in w for w in model_warnings)
    return [w for w in credential_warnings if not (redundant and w == HF_TOKEN_WARNING)] + model_warnings


# ----- the Jobs ---------------------------------------------------------------------------------


def _slug(text: str, limit: int) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "model"


def pull_job_name(model: str, pvc: str, subpath: str | None = None, revision: str | None = None) -> str:
    """The pull Job's name: the same for the same model, revision and cache, so two pulls never race.

    Returns:
        ``dfk8s-pull-<model slug>-<8 hex>``, at most 63 characters (the ``job-name`` label limit).

    """
    digest = hashlib.sha256(f"{model}\0{revision or 'main'}\0{pvc}\0{subpath or ''}".encode()).hexdigest()[:8]
    return f"dfk8s-pull-{_slug(model.split('/')[-1], 63 - len('dfk8s-pull-') - 9)}-{digest}"


def _labels(component: str, job_name: str, pvc: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "dfk8s",
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "dfk8s",
        "dfk8s.io/component": component,
        "dfk8s.io/model-cache": pvc[:63],
        MODEL_JOB_LABEL: job_name,
    }


def _model_job(
    *,
    name: str,
    namespace: str,
    component: str,
    container: dict[str, Any],
    pvc: str,
    subpath: str | None,
    read_only: bool,
    spec: dict[str, Any],
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    labels = _labels(component, name, pvc)
    container = {
        **container,
        "imagePullPolicy": "IfNotPresent",
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            model_cache_mount(subpath, read_only=read_only),
        ],
    }
    pod_spec = {
        "restartPolicy": "Never",
        # It talks to the Hub only; a token would be a credential for nothing.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        # fsGroup makes the claim writable for the non-root user; checking only its root keeps a retry
        # from re-chowning tens of GB of weights (read-only mounts are never chowned).
        "securityContext": {**_pod_security(), "fsGroupChangePolicy": "OnRootMismatch"},
        "containers": [container],
        "volumes": [
            {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
            {"name": "model-cache", **model_cache_volume(pvc, read_only=read_only)},
        ],
    }
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels}
    if annotations:
        metadata["annotations"] = annotations
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {**spec, "template": {"metadata": {"labels": labels}, "spec": pod_spec}},
    }


def build_pull_job(
    model: str,
    *,
    pvc: str,
    namespace: str,
    image: str,
    subpath: str | None = None,
    revision: str | None = None,
    hf_token_secret: tuple[str, str] | None = None,
    hf_endpoint: str | None = None,
    ttl_seconds_after_finished: int = 86400,
) -> dict[str, Any]:
    """Build the Job that downloads ``model`` once into the claim ``pvc`` (mounted read-write).

    CPU-only and restricted like the workers (non-root, read-only root filesystem, all capabilities
    dropped, seccomp RuntimeDefault, no ServiceAccount token). A failed pod is retried and the retry
    resumes: finished files stay on the claim. Exit 42 (unknown model, gated without access) fails it.

    Raises:
        SpecError: A bad model name, claim name or subpath, or a token given as a value.

    """
    if not is_hub_name(model):
        raise SpecError(f"{model!r} is not a Hub model name (org/name)")
    check_claim(pvc, subpath, "--pvc")
    if hf_token_secret is not None and (
        len(hf_token_secret) != 2 or not all(isinstance(part, str) and part for part in hf_token_secret)
    ):
        raise SpecError("hf_token_secret must be a secret reference (secret name, key), not a value")
    name = pull_job_name(model, pvc, subpath, revision)
    command = ["dfk8s", "model", "pull", model, "--to", HF_HOME]
    if revision:
        command += ["--revision", revision]
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": HF_HOME},
        # Pod logs are no terminal: the pull logs its progress every 30 s instead of drawing bars.
        {"name": "HF_HUB_DISABLE_PROGRESS_BARS", "value": "1"},
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
        {"name": "DFK8S_LOG_LEVEL", "value": "INFO"},
        # The pull makes FLUX's compile-cache folder beside the models, as the pods' user: a folder the
        # kubelet made for the pods' subPath mount would be root's, and no pod could publish into it.
        {"name": COMPILE_CACHE_ENV, "value": f"{CACHE_PATH}/{COMPILE_CACHE_FOLDER}"},
    ]
    if hf_endpoint:
        env.append({"name": "HF_ENDPOINT", "value": hf_endpoint})
    if hf_token_secret:
        secret, key = hf_token_secret
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
    container = {
        "name": PULL_CONTAINER,
        "image": image,
        "command": command,
        "env": env,
        # Downloading is network- and disk-bound; huggingface_hub streams each file to disk.
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "4", "memory": "4Gi"}},
    }
    spec = {
        "backoffLimit": 4,
        "podFailurePolicy": {
            "rules": [
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": PULL_CONTAINER,
                        "operator": "In",
                        "values": [EXIT_DO_NOT_RETRY],
                    },
                },
            ]
        },
        "ttlSecondsAfterFinished": ttl_seconds_after_finished,
    }
    annotations = {"dfk8s.io/model": model, "dfk8s.io/revision": revision or "main"}
    if subpath:
        annotations["dfk8s.io/model-cache-subpath"] = subpath
    return _model_job(
        name=name,
        namespace=namespace,
        component="model-pull",
        container=container,
        pvc=pvc,
        subpath=subpath,
        read_only=False,
        spec=spec,
        annotations=annotations,
    )


def build_list_job(*, pvc: str, namespace: str, image: str, subpath: str | None = None) -> dict[str, Any]:
    """Build the short Job that prints what the claim's cache holds (mounted read-only)."""
    check_claim(pvc, subpath, "--pvc")
    name = f"dfk8s-model-list-{secrets.token_hex(3)}"
    container = {
        "name": LIST_CONTAINER,
        "image": image,
        "command": ["dfk8s", "model", "list", "--dir", HF_HOME, "--json"],
        "env": [{"name": "HOME", "value": "/tmp"}],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
    }
    spec = {"backoffLimit": 0, "activeDeadlineSeconds": 600, "ttlSecondsAfterFinished": 600}
    return _model_job(
        name=name,
        namespace=namespace,
        component="model-list",
        container=container,
        pvc=pvc,
        subpath=subpath,
        read_only=True,
        spec=spec,
    )
