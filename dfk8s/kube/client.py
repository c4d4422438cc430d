"""Talking to a cluster: one place that loads the credentials and turns API errors into one-line errors.

Outside a cluster the kubeconfig is used (``--kubeconfig``, ``$KUBECONFIG`` or ``~/.kube/config``,
``--context``); inside one (a launcher or reducer pod) the pod's ServiceAccount. Every call to the
API goes through :func:`api_errors`, so the CLI prints ``not allowed: ...`` instead of a traceback.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dfk8s.errors import KubernetesError

__all__ = [
    "KubeClients",
    "api_errors",
    "connect",
    "default_namespace",
    "delete_run",
    "find_run_jobs",
    "job_events",
    "kube_error",
    "list_dfk8s_jobs",
    "read_pod_log",
    "run_pods",
    "server_version",
    "service_account_exists",
    "to_dict",
]

log = logging.getLogger(__name__)

#: Where a pod finds its ServiceAccount's namespace (and token).
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
#: Seconds one non-watch request may take before it is abandoned.
REQUEST_TIMEOUT = 30


@dataclass
class KubeClients:
    """The API clients of one cluster connection.

    Attributes:
        api: The shared ``ApiClient`` (configuration, connection pool).
        batch: ``BatchV1Api`` (Jobs).
        core: ``CoreV1Api`` (pods and their logs).
        namespace: The namespace of the kubeconfig context or of the pod; ``default`` if none.
        where: Which cluster, for messages (server URL and context).

    """

    api: Any
    batch: Any
    core: Any
    namespace: str
    where: str

    def close(self) -> None:
        """Release the connection pool."""
        self.api.close()


def _kubeconfig_file(kubeconfig: str | None) -> str:
    # Resolved on every call: the kubernetes package reads $KUBECONFIG once, when it is imported.
    return kubeconfig or os.environ.get("KUBECONFIG") or str(Path("~/.kube/config").expanduser())


def _kubeconfig_wanted(kubeconfig: str | None, context: str | None) -> bool:
    if kubeconfig or context or os.environ.get("KUBECONFIG"):
        return True
    if Path("~/.kube/config").expanduser().is_file():
        return True
    return not os.environ.get("KUBERNETES_SERVICE_HOST")


def cluster_configured(kubeconfig: str | None = None, context: str | None = None) -> bool:
    """Whether a cluster is configured: a kubeconfig (flag, ``$KUBECONFIG``, ``~/.kube/config``) or a pod's.

    Without one, a run is looked for only on storage.
    """
    if kubeconfig or context:
        return True
    listed = os.environ.get("KUBECONFIG")
    if listed and any(Path(p).expanduser().is_file() for p in listed.split(os.pathsep) if p):
        return True
    return Path("~/.kube/config").expanduser().is_file() or bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def connect(context: str | None = None, kubeconfig: str | None = None) -> KubeClients:
    """Connect with the kubeconfig outside a cluster, or the pod's ServiceAccount inside one.

    Args:
        context: kubeconfig context (default: the current one).
        kubeconfig: kubeconfig file (default: ``$KUBECONFIG``, then ``~/.kube/config``).

    Returns:
        The clients and the default namespace.

    Raises:
        KubernetesError: No usable configuration.

    """
    try:
        from kubernetes import client, config
    except ImportError:
        raise KubernetesError(
            "the Kubernetes commands need the kubernetes package: pip install 'dfk8s[kube]'"
        ) from None

    configuration = client.Configuration()
    if _kubeconfig_wanted(kubeconfig, context):
        try:
            config.load_kube_config(
                config_file=_kubeconfig_file(kubeconfig),
                context=context,
                client_configuration=configuration,
                persist_config=False,
            )
        except config.ConfigException as exc:
            raise KubernetesError(f"cannot load the kubeconfig: {_first_line(exc)}") from None
        namespace = _kubeconfig_namespace(kubeconfig, context)
        where = f"{configuration.host} (context {context or _current_context(kubeconfig)})"
    else:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException as exc:
            raise KubernetesError(f"cannot use the pod's service account: {_first_line(exc)}") from None
        namespace = _pod_namespace() or "default"
        where = f"{configuration.host} (in-cluster)"
    api = client.ApiClient(configuration)
    return KubeClients(
        api=api, batch=client.BatchV1Api(api), core=client.CoreV1Api(api), namespace=namespace, where=where
    )


def default_namespace(context: str | None = None, kubeconfig: str | None = None) -> str:
    """Return the namespace commands use without ``--namespace``; never fails (``default`` when unknown)."""
    try:
        if _kubeconfig_wanted(kubeconfig, context):
            return _kubeconfig_namespace(kubeconfig, context)
        return _pod_namespace() or "default"
    except Exception:  # no kubeconfig at all: a dry run still works
        return "default"


def _kubeconfig_namespace(kubeconfig: str | None, context: str | None) -> str:
    from kubernetes import config

    try:
        contexts, active = config.list_kube_config_contexts(config_file=_kubeconfig_file(kubeconfig))
    except (config.ConfigException, OSError):
        return "default"
    chosen = active if context is None else next((c for c in contexts if c.get("name") == context), None)
    return ((chosen or {}).get("context") or {}).get("namespace") or "default"


def _current_context(kubeconfig: str | None) -> str:
    from kubernetes import config

    try:
        return config.list_kube_config_contexts(config_file=_kubeconfig_file(kubeconfig))[1].get("name", "?")
    except Exception:
        return "?"


def _pod_namespace() -> str | None:
    try:
        return (SERVICE_ACCOUNT_DIR / "namespace").read_text().strip() or None
    except OSError:
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def api_message(exc) -> str:
    """Return the API server's own message from an ``ApiException`` (its Status body), else its reason."""
    try:
        body = json.loads(exc.body or "")
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    except (TypeError, ValueError):
        pass
    return str(exc.reason or f"HTTP {exc.status}")


def kube_error(exc, doing: str, *, not_found: str | None = None) -> KubernetesError:
    """Turn an ``ApiException`` into a one-line :class:`KubernetesError`.

    Args:
        exc: The exception.
        doing: What was being done, e.g. ``"creating job x"``.
        not_found: The message for a 404 (default: the server's).

    """
    status, message = exc.status, api_message(exc)
    if status == 401:
        text = (
            f"not allowed: the cluster did not accept the credentials while {doing} (401): check the "
            "kubeconfig"
        )
    elif status == 403:
        text = f"not allowed: {message}"
    elif status == 404:
        text = not_found or f"not found: {message}"
    elif status == 409:
        text = f"already exists: {message}"
    elif status == 422:
        text = f"invalid: {message}"
    else:
        text = f"the Kubernetes API failed while {doing} ({status}): {message}"
    error = KubernetesError(text)
    error.status = status  # type: ignore[attr-defined]
    return error


@contextmanager
def api_errors(doing: str, *, not_found: str | None = None) -> Iterator[None]:
    """Map API and connection failures inside the block to one-line :class:`KubernetesError`."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        yield
    except ApiException as exc:
        raise kube_error(exc, doing, not_found=not_found) from None
    except HTTPError as exc:
        raise KubernetesError(f"cannot reach the Kubernetes API while {doing}: {_first_line(exc)}") from None


def to_dict(api, obj) -> dict:
    """Return an API model (or a dict) as the JSON dict the server sent (camelCase keys)."""
    if isinstance(obj, dict):
        return obj
    return api.sanitize_for_serialization(obj)


# ----- a run's objects --------------------------------------------------------------------------

#: Label every object of every dfk8s run carries (see ``dfk8s.kube.manifests.run_labels``).
APP_SELECTOR = "app.kubernetes.io/name=dfk8s"
RUN_LABEL = "dfk8s.io/run"
COMPONENT_LABEL = "dfk8s.io/component"
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"


def find_run_jobs(clients: KubeClients, namespace: str, run_id: str) -> dict[str, Any]:
    """Return the run's Jobs by component (``map``, ``reduce``), as API models; missing ones are absent."""
    with api_errors(f"listing the jobs of run {run_id}"):
        listed = clients.batch.list_namespaced_job(
            namespace, label_selector=f"{APP_SELECTOR},{RUN_LABEL}={run_id}", _request_timeout=REQUEST_TIMEOUT
        )
    return {(job.metadata.labels or {}).get(COMPONENT_LABEL, job.metadata.name): job for job in listed.items}


def job_events(
    clients: KubeClients, namespace: str, job_name: str, *, reason: str | None = None
) -> list[str]:
    """Return the messages of a Job's events (oldest first); [] when events may not be read (403)."""
    from kubernetes.client.exceptions import ApiException

    selector = f"involvedObject.kind=Job,involvedObject.name={job_name}"
    if reason:
        selector += f",reason={reason}"
    try:
        listed = clients.core.list_namespaced_event(
            namespace, field_selector=selector, _request_timeout=REQUEST_TIMEOUT
        )
    except ApiException as exc:
        if exc.status in (401, 403, 404):
            log.debug("cannot read the events of job %s: %s", job_name, exc.status)
            return []
        raise kube_error(exc, f"reading the events of job {job_name}") from None
    events = sorted(
        listed.items,
        key=lambda e: str(e.last_timestamp or e.event_time or e.metadata.creation_timestamp or ""),
    )
    return [e.message or e.reason or "" for e in events]


def service_account_exists(clients: KubeClients, namespace: str, name: str) -> bool | None:
    """Tell whether a ServiceAccount exists; None when these credentials may not look (403)."""
    from kubernetes.client.exceptions import ApiException

    try:
        clients.core.read_namespaced_service_account(name, namespace, _request_timeout=REQUEST_TIMEOUT)
        return True
    except ApiException as exc:
        if exc.status == 404:
            return False
        if exc.status in (401, 403):
            return None
        raise kube_error(exc, f"reading ServiceAccount {name}") from None


def server_version(clients: KubeClients) -> str | None:
    """The cluster's git version (``v1.33.13``); None when it cannot be read."""
    from kubernetes import client

    try:
        return client.VersionApi(clients.api).get_code(_request_timeout=REQUEST_TIMEOUT).git_version
    except Exception as exc:  # a version we cannot read is no reason to refuse a submit
        log.debug("cannot read the server version: %s", exc)
        return None


def list_dfk8s_jobs(clients: KubeClients, namespace: str) -> list[dict]:
    """Return every dfk8s Job in the namespace, as dicts."""
    with api_errors(f"listing jobs in namespace {namespace}"):
        listed = clients.batch.list_namespaced_job(
            namespace, label_selector=APP_SELECTOR, _request_timeout=REQUEST_TIMEOUT
        )
    return [to_dict(clients.api, job) for job in listed.items]


def run_pods(
    clients: KubeClients,
    namespace: str,
    run_id: str,
    *,
    component: str | None = None,
    index: int | None = None,
) -> list[dict]:
    """Return the run's pods (oldest first), optionally of one component and one index, as dicts."""
    selector = f"{RUN_LABEL}={run_id}"
    if component:
        selector += f",{COMPONENT_LABEL}={component}"
    if index is not None:
        selector += f",{INDEX_LABEL}={index}"
    with api_errors(f"listing the pods of run {run_id}"):
        listed = clients.core.list_namespaced_pod(
            namespace, label_selector=selector, _request_timeout=REQUEST_TIMEOUT
        )
    pods = [to_dict(clients.api, pod) for pod in listed.items]
    # Timestamps have one-second resolution: within a second, a pod still going is the newer attempt.
    return sorted(
        pods,
        key=lambda pod: (
            pod["metadata"].get("creationTimestamp") or "",
            (pod.get("status") or {}).get("phase") in ("Pending", "Running"),
            pod["metadata"]["name"],
        ),
    )


def pod_index(pod: dict) -> int | None:
    """Return the completion index of a map pod (annotation, or label on Kubernetes >= 1.28)."""
    meta = pod.get("metadata") or {}
    value = (meta.get("annotations") or {}).get(INDEX_LABEL) or (meta.get("labels") or {}).get(INDEX_LABEL)
    return int(value) if value is not None and str(value).isdigit() else None


def pod_waiting_reason(pod: dict) -> str | None:
    """Why a pod's container has not started (``ContainerCreating``, ``CreateContainerConfigError: ...``)."""
    for status in (pod.get("status") or {}).get("containerStatuses") or ():
        waiting = (status.get("state") or {}).get("waiting")
        if waiting:
            reason = waiting.get("reason") or "waiting"
            return f"{reason}: {waiting['message']}" if waiting.get("message") else reason
    if (pod.get("status") or {}).get("phase") == "Pending":
        return "Pending"
    return None


def read_pod_log(
    clients: KubeClients,
    namespace: str,
    pod: str,
    container: str,
    *,
    follow: bool = False,
    tail: int | None = None,
) -> Iterator[str]:
    """Yield a pod's log lines; with ``follow``, until the container ends."""
    kwargs: dict[str, Any] = {"container": container}
    if tail is not None:
        kwargs["tail_lines"] = tail
    with api_errors(f"reading the log of pod {pod}", not_found=f"pod {pod} not found (deleted?)"):
        if not follow:
            text = clients.core.read_namespaced_pod_log(
                pod, namespace, _request_timeout=REQUEST_TIMEOUT, **kwargs
            )
            yield from (text or "").splitlines()
            return
        from kubernetes import watch

        yield from watch.Watch().stream(clients.core.read_namespaced_pod_log, pod, namespace, **kwargs)


def delete_run(
    clients: KubeClients, namespace: str, run_id: str, jobs: dict[str, Any] | None = None
) -> tuple[list[str], list[str]]:
    """Delete the run's Jobs (their pods with them) and any pod left; storage is not touched.

    Args:
        clients: The cluster.
        namespace: The run's namespace.
        run_id: The run.
        jobs: The run's Jobs from :func:`find_run_jobs`, if already listed.

    Returns:
        The names of the Jobs and of the pods deleted.

    Raises:
        KubernetesError: "run not found" when the run has neither Jobs nor pods.

    """
    from kubernetes.client.exceptions import ApiException

    if jobs is None:
        jobs = find_run_jobs(clients, namespace, run_id)
    deleted_jobs = []
    for job in jobs.values():
        name = job.metadata.name
        try:
            # batch/v1 Jobs orphan their pods unless told otherwise.
            with api_errors(f"deleting job {name}"):
                clients.batch.delete_namespaced_job(
                    name, namespace, propagation_policy="Background", _request_timeout=REQUEST_TIMEOUT
                )
            deleted_jobs.append(name)
        except KubernetesError as exc:
            if getattr(exc, "status", None) != 404:
                raise
    deleted_pods = []
    # The garbage collector removes the pods in the background; deleting them here makes the cancel
    # take effect now, and catches pods an earlier orphaning delete left behind.
    for pod in run_pods(clients, namespace, run_id):
        name = pod["metadata"]["name"]
        try:
            clients.core.delete_namespaced_pod(name, namespace, _request_timeout=REQUEST_TIMEOUT)
            deleted_pods.append(name)
        except ApiException as exc:
            if exc.status != 404:
                raise kube_error(exc, f"deleting pod {name}") from None
    if not deleted_jobs and not deleted_pods:
        raise KubernetesError(f"run not found: no Jobs or pods of run {run_id} in namespace {namespace}")
    return deleted_jobs, deleted_pods
