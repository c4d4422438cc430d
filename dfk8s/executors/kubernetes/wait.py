"""Waiting for a run's map Job to end, and reading a Job's state (what the reduce Job does first).

The Job object is the only place a finished Indexed Job says which indexes failed
(``status.failedIndexes``, e.g. ``"1,3-5"``); the reducer names those shards in the summary. Reading
a Job's state is pure (dicts in, a :class:`JobState` out) so it is unit-tested without a cluster.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dfk8s.errors import EXIT_DO_NOT_RETRY, KubernetesError, retry_after_seconds

__all__ = [
    "JobDeleted",
    "JobState",
    "WaitNotAllowed",
    "format_indexes",
    "job_state",
    "parse_indexes",
    "wait_for_job_end",
]

log = logging.getLogger(__name__)

#: Seconds one watch request stays open before the wait re-lists (the API server may end it sooner).
WATCH_SECONDS = 300
#: Longest pause between attempts when the API cannot be reached.
MAX_BACKOFF_SECONDS = 30.0


class JobDeleted(KubernetesError):
    """The Job waited for was deleted (the run was cancelled); nothing is reduced."""

    exit_code = EXIT_DO_NOT_RETRY


class WaitNotAllowed(KubernetesError):
    """The credentials may not read the Job (401/403): a retried pod would be refused just the same."""

    exit_code = EXIT_DO_NOT_RETRY


def _retry_after(exc, default: float) -> float:
    """Seconds a 429 asks to wait (its ``Retry-After`` header), else ``default``; at most 60."""
    value = retry_after_seconds((exc.headers or {}).get("Retry-After"))
    return default if value is None else min(60.0, value)


def parse_indexes(text: str | None) -> list[int]:
    """Parse a Job's index list (``status.completedIndexes`` / ``failedIndexes``) into sorted indexes.

    Args:
        text: Comma-separated indexes and inclusive ranges, e.g. ``"1,3-5"``; None or ``""`` for none.

    Returns:
        The indexes, sorted, without duplicates: ``[1, 3, 4, 5]``.

    Raises:
        ValueError: The text is not such a list.

    """
    indexes: set[int] = set()
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"not an index list: {text!r}")
        start, end = int(low), int(high) if dash else int(low)
        if end < start:
            raise ValueError(f"not an index list: {text!r}")
        indexes.update(range(start, end + 1))
    return sorted(indexes)


def format_indexes(indexes) -> str:
    """Write indexes the way the Job controller does: ``[1, 3, 4, 5, 7, 8]`` -> ``"1,3-5,7,8"``.

    Two neighbours are written ``7,8``, three or more as a range (``orderedIntervals.String`` of the
    Job controller).
    """
    ordered = sorted(set(indexes))
    runs: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        if i == j:
            runs.append(str(ordered[i]))
        else:
            runs.append(f"{ordered[i]}{',' if j == i + 1 else '-'}{ordered[j]}")
        i = j + 1
    return ",".join(runs)


@dataclass
class JobState:
    """What a Job's status says.

    Attributes:
        name: The Job's name.
        finished: ``"Complete"``, ``"Failed"`` or None while it runs.
        reason: The reason of the finishing condition (``FailedIndexes``, ``DeadlineExceeded``, ...).
        message: Its message.
        completions: ``spec.completions`` (shards of a map Job).
        completed: Completed indexes (Indexed Jobs).
        failed_indexes: Failed indexes (Indexed Jobs with ``backoffLimitPerIndex``).
        active: Pods running now.
        succeeded: Pods that succeeded.
        failed_pods: Pods that failed (retried or not).
        suspended: Waiting to be admitted (Kueue) or suspended.
        deleting: The Job is being deleted.

    """

    name: str
    finished: str | None = None
    reason: str = ""
    message: str = ""
    completions: int = 1
    completed: list[int] = field(default_factory=list)
    failed_indexes: list[int] = field(default_factory=list)
    active: int = 0
    succeeded: int = 0
    failed_pods: int = 0
    suspended: bool = False
    deleting: bool = False

    @property
    def phase(self) -> str:
        """One word: ``Complete``, ``Failed``, ``Deleting``, ``Suspended`` or ``Running``."""
        if self.finished:
            return self.finished
        if self.deleting:
            return "Deleting"
        return "Suspended" if self.suspended else "Running"

    def describe(self) -> str:
        """One line for people: phase, indexes done and failed, pods active."""
        parts = [self.phase + (f" ({self.reason})" if self.reason and self.finished else "")]
        if self.completions > 1 or self.completed or self.failed_indexes:
            parts.append(
                f"{len(self.completed)}/{self.completions} indexes completed"
                + (f" ({format_indexes(self.completed)})" if self.completed else "")
            )
        elif self.succeeded:
            parts.append(f"{self.succeeded} succeeded")
        if self.failed_indexes:
            parts.append(f"failed indexes {format_indexes(self.failed_indexes)}")
        if self.active:
            parts.append(f"{self.active} active")
        if self.failed_pods:
            parts.append(f"{self.failed_pods} pods failed")
        return ", ".join(parts)


def job_state(job: dict) -> JobState:
    """Read a Job (a dict as the API sends it, camelCase keys) into a :class:`JobState`."""
    meta, spec, status = job.get("metadata") or {}, job.get("spec") or {}, job.get("status") or {}
    state = JobState(
        name=meta.get("name", ""),
        completions=int(spec.get("completions") or 1),
        completed=_indexes(status.get("completedIndexes")),
        failed_indexes=_indexes(status.get("failedIndexes")),
        active=int(status.get("active") or 0),
        succeeded=int(status.get("succeeded") or 0),
        failed_pods=int(status.get("failed") or 0),
        suspended=bool(spec.get("suspend")),
        deleting=bool(meta.get("deletionTimestamp")),
    )
    for condition in status.get("conditions") or ():
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            state.finished = condition["type"]
            state.reason = condition.get("reason") or ""
            state.message = condition.get("message") or ""
    return state


def _indexes(text: str | None) -> list[int]:
    try:
        return parse_indexes(text)
    except ValueError:
        log.warning("cannot read the index list %r", text)
        return []


def wait_for_job_end(
    batch,
    namespace: str,
    name: str,
    *,
    to_dict: Callable = lambda obj: obj,
    watch_seconds: int = WATCH_SECONDS,
    on_change: Callable[[JobState], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> JobState:
    """Block until Job ``name`` has condition Complete or Failed; return its final state.

    Lists the Job, then watches it from the list's resourceVersion; when a watch ends (timeout, the
    server closing it, 410 Gone, a broken connection) it lists again, so no change is missed.

    Args:
        batch: A ``kubernetes.client.BatchV1Api``.
        namespace: The Job's namespace.
        name: The Job's name.
        to_dict: Turns an API model into the server's JSON dict (``ApiClient.sanitize_for_serialization``).
        watch_seconds: ``timeoutSeconds`` of each watch request.
        on_change: Called with each new state (logging, progress).
        sleep: Pause between attempts after a connection failure (tests pass a fake).

    Raises:
        JobDeleted: The Job does not exist or was deleted.
        KubernetesError: The API refused (401/403) or answered with another error.

    """
    from kubernetes import watch
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    from dfk8s.kube.client import kube_error

    selector = f"metadata.name={name}"
    backoff = 1.0
    last: JobState | None = None
    while True:
        try:
            listed = batch.list_namespaced_job(namespace, field_selector=selector, _request_timeout=60)
            if not listed.items:
                raise JobDeleted(
                    f"job {name} not found in namespace {namespace} (deleted: the run was "
                    "cancelled); nothing reduced"
                )
            state = job_state(to_dict(listed.items[0]))
            last = _report(state, last, on_change)
            if state.finished:
                return state
            backoff = 1.0
            stream = watch.Watch()
            for event in stream.stream(
                batch.list_namespaced_job,
                namespace,
                field_selector=selector,
                resource_version=listed.metadata.resource_version,
                timeout_seconds=watch_seconds,
                _request_timeout=watch_seconds + 30,
            ):
                if event["type"] == "DELETED":
                    stream.stop()
                    raise JobDeleted(f"job {name} was deleted (the run was cancelled); nothing reduced")
                state = job_state(event["raw_object"])
                last = _report(state, last, on_change)
                if state.finished:
                    stream.stop()
                    return state
            log.debug("watch of job %s ended; listing again", name)
        except ApiException as exc:
            if exc.status == 410:  # the resourceVersion is too old: list again
                log.info("watch of job %s expired; listing again", name)
                continue
            if exc.status == 429:  # API priority and fairness (or a busy server): come back later
                pause = _retry_after(exc, backoff)
                log.warning("the API is busy (429) while watching job %s; retrying in %.0fs", name, pause)
                sleep(pause)
                backoff = min(MAX_BACKOFF_SECONDS, backoff * 2)
                continue
            if exc.status in (401, 403):
                error = kube_error(exc, f"watching job {name}")
                raise WaitNotAllowed(
                    f"{error} (watching job {name} in namespace {namespace} needs get/list/watch on jobs: "
                    "run the reduce Job as the Helm chart's reducer ServiceAccount, --service-account "
                    "<release>-dfk8s-reducer); not retrying"
                ) from None
            if exc.status in (404,) or exc.status is None or exc.status < 500:
                raise kube_error(exc, f"watching job {name}") from None
            log.warning(
                "the API answered %s while watching job %s; retrying in %.0fs", exc.status, name, backoff
            )
            sleep(backoff)
            backoff = min(MAX_BACKOFF_SECONDS, backoff * 2)
        except (HTTPError, OSError) as exc:
            log.warning(
                "lost the API while watching job %s (%s); retrying in %.0fs",
                name,
                type(exc).__name__,
                backoff,
            )
            sleep(backoff)
            backoff = min(MAX_BACKOFF_SECONDS, backoff * 2)


def _report(state: JobState, last: JobState | None, on_change) -> JobState:
    if state != last:
        log.info("job %s: %s", state.name, state.describe())
        if on_change is not None:
            on_change(state)
    return state


def wait_for_map_job(
    name: str,
    namespace: str | None = None,
    *,
    context: str | None = None,
    kubeconfig: str | None = None,
    watch_seconds: int = WATCH_SECONDS,
) -> JobState:
    """Connect (in-cluster in the reduce Job's pod) and wait for the map Job ``name`` to end.

    Args:
        name: The map Job's name.
        namespace: Its namespace; None for the pod's (or the kubeconfig context's).
        context: kubeconfig context, outside a cluster.
        kubeconfig: kubeconfig file, outside a cluster.
        watch_seconds: ``timeoutSeconds`` of each watch request.

    Returns:
        The map Job's final state; ``failed_indexes`` are the shards that failed for good.

    """
    from dfk8s.kube.client import connect, to_dict

    clients = connect(context=context, kubeconfig=kubeconfig)
    try:
        return wait_for_job_end(
            clients.batch,
            namespace or clients.namespace,
            name,
            to_dict=lambda obj: to_dict(clients.api, obj),
            watch_seconds=watch_seconds,
        )
    finally:
        clients.close()
