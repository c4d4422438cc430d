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
from dataclasses import dataclass, fields
from typing import Any

from dfk8s.errors import SpecError
from dfk8s.servings import SERVINGS

#: API servings, with the seconds one request is assumed to take for the time estimate (from the
#: servings registry: guesses for typical hosted endpoints; real latency varies).
API_SERVINGS: dict[str, float] = {name: s.latency for name, s in SERVINGS.items() if s.is_api}
_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
HF_TOKEN_WARNING = "pods get no Hugging Face token (no --hf-token-secret): gated models will not load"


@dataclass(frozen=True)
class ClusterOptions:
    """The Kubernetes side of a submit: the flags beyond ``dfk8s run``'s, one field per flag.

    :class:`dfk8s.kube.manifests.KubeRunConfig` extends it with the run; the field descriptions are there.
    ``namespace`` is resolved already.
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

    @classmethod
    def from_flags(cls, flags: dict[str, Any], *, namespace: str) -> ClusterOptions:
        """Build from the submit command's flags (one per field, named alike), parsing what needs it.

        ``flags`` may hold other flags too; those named like a field are read (and removed from it).

        Raises:
            SpecError: A Secret reference, node selector or toleration of the wrong shape.
        """
        given = {f.name: flags.pop(f.name) for f in fields(cls) if f.name in flags}
        given["api_key_secret"] = parse_secret_ref(given.get("api_key_secret"), "--api-key-secret")
        given["hf_token_secret"] = parse_secret_ref(given.get("hf_token_secret"), "--hf-token-secret")
        given["node_selector"] = parse_node_selector(tuple(given.get("node_selector") or ()))
        given["tolerations"] = tuple(parse_toleration(t) for t in given.get("tolerations") or ()) or None
        given["namespace"] = namespace
        return cls(**given)


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
        local = next((name for name in SERVINGS[serving].credentials if environ.get(name)), None)
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
    if options.hf_token_secret is None and SERVINGS[serving].gpu and environ.get("HF_TOKEN"):
        warnings.append(HF_TOKEN_WARNING)
    if options.service_account is None:
        warnings.append(
            "the reduce Job runs as the namespace's default ServiceAccount; it must be allowed "
            "to get/list/watch jobs (the Helm chart's reducer account: --service-account)"
        )
    return warnings
