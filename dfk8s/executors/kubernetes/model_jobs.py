"""Model Jobs on the cluster: create a ``dfk8s model pull`` or ``list`` Job, wait, read its log, delete it.

The Jobs themselves are built by :mod:`dfk8s.kube.model_jobs` (pure builders).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from dfk8s.errors import KubernetesError
from dfk8s.executors.kubernetes.wait import wait_for_job_end
from dfk8s.kube.client import REQUEST_TIMEOUT, api_errors, read_pod_log, to_dict
from dfk8s.kube.model_jobs import MODEL_JOB_LABEL

log = logging.getLogger(__name__)

__all__ = ["create_model_job", "delete_model_job", "model_job_log", "wait_model_job"]


def create_model_job(clients, job: dict[str, Any], *, replace_finished: bool) -> str:
    """Create ``job``; a finished Job of the same name is deleted first when ``replace_finished``.

    Returns:
        ``"created"``, or ``"running"`` when a Job of that name is still going (it is left alone).

    Raises:
        KubernetesError: The cluster refused.

    """
    namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
    for _ in range(30):
        try:
            with api_errors(f"creating job {name}"):
                clients.batch.create_namespaced_job(namespace, job, _request_timeout=30)
            return "created"
        except KubernetesError as exc:
            if getattr(exc, "status", None) != 409:
                raise
        with api_errors(f"reading job {name}"):
            existing = to_dict(
                clients.api, clients.batch.read_namespaced_job(name, namespace, _request_timeout=30)
            )
        conditions = (existing.get("status") or {}).get("conditions") or []
        finished = any(
            c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in conditions
        )
        deleting = bool((existing.get("metadata") or {}).get("deletionTimestamp"))
        if not finished and not deleting:
            return "running"
        if not replace_finished:
            raise KubernetesError(f"job {name} already exists in namespace {namespace}")
        if not deleting:
            with api_errors(f"deleting the finished job {name}"):
                clients.batch.delete_namespaced_job(
                    name, namespace, propagation_policy="Background", _request_timeout=30
                )
        time.sleep(1)
    raise KubernetesError(f"job {name} in namespace {namespace} is still being deleted; try again shortly")


def wait_model_job(clients, namespace: str, name: str, *, on_change: Callable | None = None):
    """Block until the Job ends; returns its :class:`dfk8s.executors.kubernetes.wait.JobState`."""
    return wait_for_job_end(
        clients.batch, namespace, name, to_dict=lambda obj: to_dict(clients.api, obj), on_change=on_change
    )


def model_job_log(clients, namespace: str, name: str, container: str, *, tail: int | None = None) -> str:
    """The log of the Job's newest pod ('' when it has none)."""
    with api_errors(f"listing the pods of job {name}"):
        listed = clients.core.list_namespaced_pod(
            namespace, label_selector=f"{MODEL_JOB_LABEL}={name}", _request_timeout=REQUEST_TIMEOUT
        )
    pods = sorted(
        (to_dict(clients.api, pod) for pod in listed.items),
        key=lambda pod: pod["metadata"].get("creationTimestamp") or "",
    )
    if not pods:
        return ""
    return "\n".join(read_pod_log(clients, namespace, pods[-1]["metadata"]["name"], container, tail=tail))


def delete_model_job(clients, namespace: str, name: str) -> None:
    """Delete the Job and its pods (a missing Job is fine)."""
    try:
        with api_errors(f"deleting job {name}"):
            clients.batch.delete_namespaced_job(
                name, namespace, propagation_policy="Background", _request_timeout=30
            )
    except KubernetesError as exc:
        if getattr(exc, "status", None) != 404:
            log.warning("could not delete job %s: %s", name, exc)
