"""Reading a run back from the cluster: its state, ``status``, ``list``, ``cancel`` and ``--wait``.

Public names are re-exported by :mod:`dfk8s.executors.kubernetes`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from dfk8s.errors import Dfk8sError, KubernetesError, SpecError, StorageError
from dfk8s.executors.kubernetes._submit import Submission
from dfk8s.executors.kubernetes.wait import JobState, job_state
from dfk8s.run.status import RunStatus, reduced_state, storage_status


def run_state(map_job: JobState | None, reduce_job: JobState | None) -> str:
    """One word for a run from its Jobs: queued, running, reducing, complete, partial, failed, ..."""
    if map_job is None and reduce_job is None:
        return "gone"
    # A finished Job being deleted is the TTL controller expiring it (foreground deletion), not a
    # cancel: the run keeps the state its finished Jobs give it.
    if any(job is not None and job.deleting and not job.finished for job in (map_job, reduce_job)):
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
    details: bool = True,
) -> RunStatus:
    """Read a run's Jobs, then its storage (:func:`dfk8s.run.status.storage_status`).

    Args:
        clients: :class:`dfk8s.kube.client.KubeClients`.
        namespace: Where the Jobs are.
        run_id: The run.
        output: ``s3://bucket/prefix`` the run is under; default: read from the map Job.
        endpoint_url: S3 endpoint from here; default: the one the Jobs use.
        reader: A :class:`dfk8s.run.progress.ProgressReader` to reuse between polls.
        details: Also read the provider batches and the spend (not needed by every poll of ``--wait``).

    Raises:
        KubernetesError: "run not found" when neither Jobs nor (with ``output``) storage know it.

    """
    from dfk8s.kube.client import find_run_jobs, to_dict
    from dfk8s.storage import open_storage

    jobs = find_run_jobs(clients, namespace, run_id)
    map_raw, reduce_raw = jobs.get("map"), jobs.get("reduce")
    status = RunStatus(
        run_id=run_id,
        state="gone",
        source="cluster",
        namespace=namespace,
        map_job=job_state(to_dict(clients.api, map_raw)) if map_raw else None,
        reduce_job=job_state(to_dict(clients.api, reduce_raw)) if reduce_raw else None,
    )
    status.state = run_state(status.map_job, status.reduce_job)
    status.problems = _pod_creation_problems(clients, namespace, status)
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
        storage_status(storage, into=status, reader=reader, details=details)
        # The Jobs (or the reduce Job) expired (TTL) or were deleted after the end: the summary says.
        if status.summary and (status.state == "gone" or (status.state == "reducing" and not reduce_raw)):
            status.state = reduced_state(status.summary)
    except (StorageError, SpecError) as exc:
        if not any_job:
            raise KubernetesError(f"run not found: {exc}") from None
        status.storage_error = str(exc)
    except Exception as exc:  # storage unreachable from here (e.g. an in-cluster endpoint): still report Jobs
        status.storage_error = f"{type(exc).__name__}: {exc}"
    return status


def _pod_creation_problems(clients, namespace: str, status: RunStatus) -> list[str]:
    """Why running Jobs have no pods: the Job controller's FailedCreate events.

    A missing ServiceAccount, a quota or Pod Security refuse the pods; the Job's status never says so.
    """
    from dfk8s.kube.client import job_events

    problems = []
    for label, job in (("map", status.map_job), ("reduce", status.reduce_job)):
        if job is None or job.finished or job.active or job.suspended or job.deleting:
            continue
        for message in job_events(clients, namespace, job.name, reason="FailedCreate")[-1:]:
            problems.append(f"{label} job {job.name} cannot create its pods: {message}")
    return problems


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
    from dfk8s.run.progress import ProgressReader, progress_bar

    reader = ProgressReader(submission.storage)
    total = submission.spec.rows
    last_line = None
    try:
        with progress_bar(total, enabled=show_progress) as bar:
            task = bar.add_task(submission.run_id, total=total, completed=0, failed=0, rate="-")
            started, first_rows = time.monotonic(), None
            while True:
                try:
                    status = run_status(
                        clients, submission.namespace, submission.run_id, reader=reader, details=False
                    )
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
                if status.progress is not None and status.progress.notes:  # e.g. compiling FLUX
                    line += "; " + "; ".join(status.progress.notes)
                if status.problems:
                    line += "; " + "; ".join(status.problems)
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
