"""The cluster side of a submit: the flags beyond ``dfk8s run``'s, read and checked.

Secrets policy: a credential reaches the pods only as a Secret reference (``--api-key-secret``,
``--s3-secret``, ``--hf-token-secret``). Submitting never reads a key's value: an API serving
without ``--api-key-secret`` is refused (its pods would all exit 42), whether or not the key is set
in this shell, and the message says how to create the Secret.

Public names are re-exported by :mod:`dfk8s.kube`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dfk8s.errors import SpecError
from dfk8s.kube.manifests import KubeRunConfig
from dfk8s.profiles import Profile, load_profile
from dfk8s.servings import SERVINGS

#: API servings, with the seconds one request is assumed to take for the time estimate (from the
#: servings registry: guesses for typical hosted endpoints; real latency varies).
API_SERVINGS: dict[str, float] = {name: s.latency for name, s in SERVINGS.items() if s.is_api}
_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
HF_TOKEN_WARNING = "pods get no Hugging Face token (no --hf-token-secret): gated models will not load"


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
    model_cache_pvc: str | None = None
    model_cache_subpath: str | None = None


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
        warnings.append(HF_TOKEN_WARNING)
    if options.service_account is None:
        warnings.append(
            "the reduce Job runs as the namespace's default ServiceAccount; it must be allowed "
            "to get/list/watch jobs (the Helm chart's reducer account: --service-account)"
        )
    return warnings


def kube_run_config(
    options: ClusterOptions,
    profile: Profile,
    *,
    run_id: str,
    run_uri: str,
    shards: int,
    api_mode: str | None = None,
    endpoint_url: str | None = None,
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

    """
    return KubeRunConfig(
        run_id=run_id,
        pipeline=profile.pipeline,
        serving=profile.serving,
        run_uri=run_uri,
        shards=shards,
        parallelism=options.parallelism,
        namespace=options.namespace,
        profile=profile.for_api_mode(api_mode),  # batch mode: a small pod
        image=options.image,
        reducer_image=options.reducer_image or (cpu_image() if profile.gpu else None),
        s3_endpoint=options.cluster_s3_endpoint or endpoint_url,
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
        model_cache_pvc=options.model_cache_pvc,
        model_cache_subpath=options.model_cache_subpath,
    )


def cpu_image() -> str:
    """The CPU image of this version (from the caption profile): what reducers run, even for FLUX runs."""
    return load_profile("caption").image
