"""``dfk8s status --json``: the facts of the status display as one JSON object with stable keys.

The same keys come out for a run on a cluster (its Jobs plus its storage) and for a run read from its
storage alone (a ``dfk8s run`` on this machine); a fact that does not apply is ``null``. README.md
documents them; add keys, never rename or drop one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

#: Every key of the object, in order.
STATUS_KEYS = (
    "run_id",
    "state",
    "source",
    "namespace",
    "pipeline",
    "serving",
    "run_uri",
    "rows",
    "shards",
    "done",
    "ok",
    "failed",
    "shards_done",
    "failed_shards",
    "map_job",
    "reduce_job",
    "result",
    "summary",
    "storage_error",
    "breaker",
)


def status_document(**facts: Any) -> dict[str, Any]:
    """Return the status object: every key of :data:`STATUS_KEYS`, ``null`` where ``facts`` has none.

    ``failed_shards`` and ``result`` default to the summary's; ``shards_done`` and ``failed_shards`` are
    sorted lists.

    Raises:
        TypeError: A key that is not in :data:`STATUS_KEYS` (the keys are a contract).
    """
    unknown = set(facts) - set(STATUS_KEYS)
    if unknown:
        raise TypeError(f"not status keys: {sorted(unknown)}")
    doc = {key: facts.get(key) for key in STATUS_KEYS}
    summary = doc["summary"] or {}
    if doc["failed_shards"] is None:
        doc["failed_shards"] = sorted(summary.get("failed_shards") or [])
    if doc["result"] is None:
        doc["result"] = summary.get("result") or None
    doc["shards_done"] = sorted(doc["shards_done"] or [])
    for job in ("map_job", "reduce_job"):
        if dataclasses.is_dataclass(doc[job]):
            doc[job] = dataclasses.asdict(doc[job])
    return doc


def from_status(status) -> dict[str, Any]:
    """The object for a :class:`dfk8s.run.status.RunStatus`, of either executor.

    ``serving`` is run.json's, else (storage unreadable from here) the summary's.
    """
    progress = status.progress
    summary = status.summary
    return status_document(
        run_id=status.run_id,
        state=status.state,
        source=status.source,
        namespace=status.namespace,
        pipeline=status.pipeline,
        serving=status.serving or (summary or {}).get("serving"),
        run_uri=status.run_uri,
        rows=status.rows,
        shards=status.shards,
        done=progress.rows if progress else None,
        ok=progress.ok if progress else None,
        failed=progress.failed if progress else None,
        shards_done=status.shards_done,
        map_job=status.map_job,
        reduce_job=status.reduce_job,
        summary=summary,
        storage_error=status.storage_error,
        breaker=status.breaker,
    )
