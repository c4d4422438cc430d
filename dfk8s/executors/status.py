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

from dfk8s import layout
from dfk8s.errors import NotFound

__all__ = ["RunStatus", "reduced_state", "storage_status"]


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
        progress: A :class:`dfk8s.progress.Progress`: rows finished so far.
        shards_done: Indexes of the shards with a done marker, sorted.
        summary: summary.json, or None before the reduce.
        batches: One line per shard with a provider batch (``--api-mode batch``).
        spend: The ``spent: ...`` line of a priced run (empty when unpriced).
        breaker: breaker.json: the circuit breaker stopped the run (``shard``, ``type``, ``message``,
            ``hint``); None when it did not, or since a resume cleared it.
        storage_error: Why storage could not be read from here (a cluster run's Jobs are still shown).
        problems: Why running Jobs have no pods (the Job controller's FailedCreate events).

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
        reader: A :class:`dfk8s.progress.ProgressReader` of ``storage`` to reuse between polls (each
            part and done marker is read once).
        details: Also read the provider batches and the spend (one or two reads per shard: a poll that
            only draws progress leaves them out).

    Returns:
        ``into``, or the new status.

    Raises:
        SpecError: No run.json (not a run, or not planned yet).
        StorageError: Storage cannot be read.

    """
    from dfk8s.progress import ProgressReader
    from dfk8s.spec import RunSpec

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
    status.breaker = _read_breaker(storage)
    if details:
        from dfk8s.batch import describe_batches
        from dfk8s.budget import describe_spend

        status.batches = describe_batches(storage, spec.shards)
        status.spend = describe_spend(storage, spec.shards)
    if into is None:
        status.state = reduced_state(status.summary) or "unreduced"
    return status


def _read_breaker(storage) -> dict | None:
    try:
        breaker = storage.read_json(layout.BREAKER_KEY)
    except (NotFound, ValueError):
        return None
    return breaker if isinstance(breaker, dict) else {"message": str(breaker)}
