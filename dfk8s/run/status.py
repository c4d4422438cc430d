"""A run's status: what its storage says, read by one builder for both executors.

Storage holds every fact that is the same wherever the run ran: the spec (pipeline, serving, rows,
shards), the progress (done markers, checkpoint parts, live counts), the summary once reduced, a
tripped circuit breaker, the provider batches and the spend. :func:`storage_status` reads them; the
local executor reports just that, the Kubernetes executor adds its Jobs (and their pods' problems).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dfk8s.errors import Dfk8sError, NotFound
from dfk8s.run import breaker, layout

__all__ = ["RunStatus", "StoredRun", "list_stored_runs", "reduced_state", "storage_status"]


@dataclass
class RunStatus:
    """A run as its executor and its storage see it.

    Attributes:
        run_id: The run.
        state: A cluster run's state from its Jobs (``running``, ``complete``, ...); from storage alone
            ``complete``, ``partial`` or ``unreduced`` (no Jobs to ask: running, stopped or crashed look
            alike until reduced).
        source: ``storage`` (only storage was read) or ``cluster`` (the Jobs too).
        namespace: The Jobs' namespace (None from storage).
        map_job: The map Job's :class:`~dfk8s.executors.kubernetes.wait.JobState` (None without one).
        reduce_job: The reduce Job's.
        pipeline: From run.json (a Job label while storage cannot be read).
        serving: From run.json.
        run_uri: The run's folder or ``s3://`` prefix.
        rows: Planned rows.
        shards: Planned shards.
        progress: A :class:`dfk8s.run.progress.Progress`: rows finished so far.
        shards_done: Indexes of the shards with a done marker, sorted.
        summary: summary.json, or None before the reduce.
        batches: One line per shard with a provider batch (``--api-mode batch``).
        spend: The ``spent: ...`` line of a priced run (empty when unpriced).
        breaker: breaker.json: the circuit breaker stopped the run (``shard``, ``type``, ``message``,
            ``hint``); None when it did not, or since a resume cleared it.
        storage_error: Why storage could not be read from here (a cluster run's Jobs are still shown).
        problems: Why running Jobs have no pods (the Job controller's FailedCreate events).
        launcher: A local run's launcher (lease.json): ``pid``, ``host``, ``heartbeat_age``, ``live``,
            and the progress it last saw (``rows_per_s``, ``eta_seconds``, ``spent_usd``); None without one.

    """

    run_id: str
    state: str
    source: str = "storage"
    namespace: str | None = None
    map_job: Any = None
    reduce_job: Any = None
    pipeline: str | None = None
    serving: str | None = None
    run_uri: str | None = None
    rows: int | None = None
    shards: int | None = None
    progress: Any = None
    shards_done: list[int] = field(default_factory=list)
    summary: dict | None = None
    batches: list[str] = field(default_factory=list)
    spend: list[str] = field(default_factory=list)
    breaker: dict | None = None
    storage_error: str | None = None
    problems: list[str] = field(default_factory=list)
    launcher: dict | None = None

    def to_dict(self) -> dict:
        """Return every field, JSON-able (the Job states and the progress as dicts)."""
        return dataclasses.asdict(self)


def reduced_state(summary: dict | None) -> str | None:
    """``complete`` or ``partial`` for a reduced run (from its summary), None before the reduce."""
    if not summary:
        return None
    return "complete" if summary.get("complete") else "partial"


def storage_status(storage, *, into: RunStatus | None = None, reader=None, details: bool = True) -> RunStatus:
    """Read a run's status from storage: spec, progress, summary, breaker, (``details``) batches and spend.

    Args:
        storage: The run's storage.
        into: A status to fill (the Kubernetes executor's, with its Jobs); its ``state`` is left alone.
            Default: a new ``storage`` status whose state comes from the summary (``unreduced`` before it).
        reader: A :class:`dfk8s.run.progress.ProgressReader` of ``storage`` to reuse between polls (each
            part and done marker is read once).
        details: Also read the provider batches and the spend (one or two reads per shard: a poll that
            only draws progress leaves them out).

    Returns:
        ``into``, or the new status.

    Raises:
        SpecError: No run.json (not a run, or not planned yet).
        StorageError: Storage cannot be read.

    """
    from dfk8s.run.progress import ProgressReader
    from dfk8s.run.spec import RunSpec

    spec = RunSpec.load(storage)
    status = into if into is not None else RunStatus(run_id=spec.run_id, state="unreduced")
    status.run_uri = status.run_uri or storage.url()
    status.pipeline, status.serving, status.rows, status.shards = (
        spec.pipeline, spec.serving, spec.rows, spec.shards)
    reader = reader if reader is not None else ProgressReader(storage)
    status.progress = reader.poll()
    status.shards_done = sorted(reader.done_shards())
    try:
        status.summary = storage.read_json(layout.SUMMARY_KEY)
    except NotFound:
        status.summary = None
    status.breaker = breaker.read(storage)
    if details:
        from dfk8s.cost.budget import describe_spend
        from dfk8s.servings.batch_mode import describe_batches

        status.batches = describe_batches(storage, spec.shards)
        status.spend = describe_spend(storage, spec.shards)
    if into is None:
        from dfk8s.run.lease import read_lease

        status.launcher = read_lease(storage)
        live = bool(status.launcher and status.launcher.get("live"))
        # A launcher at work wins over the summary of an earlier session (a resume reduces again).
        status.state = "running" if live else reduced_state(status.summary) or "unreduced"
    return status


@dataclass
class StoredRun:
    """One run found on storage (``dfk8s list --output``), from its records alone."""

    run_id: str
    pipeline: str
    state: str
    rows: int
    done: int
    shards: int
    created: str
    where: str


def list_stored_runs(storage) -> list[StoredRun]:
    """The runs under ``storage`` (an ``--output``): each folder with a run.json, newest first."""
    import time

    from dfk8s.run.lease import read_lease
    from dfk8s.run.spec import RunSpec

    found = []
    for name in storage.folders():
        run = storage.child(name)
        try:
            spec = RunSpec.load(run)
        except Dfk8sError:
            continue  # not a run, or one whose plan did not finish
        try:
            summary = run.read_json(layout.SUMMARY_KEY)
        except (NotFound, ValueError):
            summary = None
        lease = read_lease(run)
        live = bool(lease and lease.get("live"))
        state = "running" if live else reduced_state(summary) or "unreduced"
        done = (lease or {}).get("done") if live else None
        if done is None:
            done = (summary or {}).get("ok", 0) + (summary or {}).get("failed", 0)
        found.append(StoredRun(spec.run_id, spec.pipeline, state, spec.rows, int(done), spec.shards,
                               time.strftime("%Y-%m-%d %H:%M", time.localtime(spec.created_at)), run.url()))
    return sorted(found, key=lambda r: r.created, reverse=True)
