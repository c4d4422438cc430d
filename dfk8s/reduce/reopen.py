"""Retry only the failed rows of a run: reopen their shards on storage, so any executor runs just those rows.

A finished shard is reopened by turning its output back into a checkpoint part that holds every row
that stays (rows that succeeded, and failed rows not chosen for the retry), then removing its done
marker. A worker (local or a pod) then resumes the shard as after an interruption: it skips the rows
in the part and sends only the chosen ones. Rows that succeeded are never sent again.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

from dfk8s.errors import NotFound, SpecError
from dfk8s.run import layout
from dfk8s.run.spec import RunSpec

log = logging.getLogger(__name__)

#: Error types a plain ``dfk8s retry`` re-runs: failures that can pass (rate limits, server errors,
#: timeouts, connection trouble, garbled answers) and rows that were never processed. An
#: ``ImageFetchError`` marked ``transient`` (the image host timed out, 429/5xx) is re-run too.
RETRYABLE_ERROR_TYPES = frozenset({
    "RateLimited", "ServerError", "Timeout", "ConnectionError", "ConnectionRefused", "DNSError",
    "MalformedResponse", "EmptyResponse", "DownloadFailed", "OutOfMemory", "NotProcessed"})


@dataclass
class RetryPlan:
    """What a retry reopened.

    Attributes:
        rows: Rows that will be sent again.
        shards: Shards to run (reopened ones and unfinished ones).
        by_type: Rows chosen, by error type.
        changes: Serving options changed for the retry: ``{name: [old, new]}``.
    """

    rows: int = 0
    shards: list[int] = field(default_factory=list)
    by_type: dict[str, int] = field(default_factory=dict)
    changes: dict[str, list] = field(default_factory=dict)


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _chosen(error: dict | None, types: frozenset[str] | None) -> bool:
    kind = (error or {}).get("type") or "Error"
    if types is None or kind in types:
        return True
    # The default choice also takes image fetches that can pass (not a 404 or a dead host).
    return (types == RETRYABLE_ERROR_TYPES and kind == "ImageFetchError"
            and bool((error or {}).get("transient")))


def plan_retry(storage, *, types: set[str] | None = None, all_errors: bool = False,
               options: dict | None = None, serving: str | None = None) -> tuple[RunSpec, RetryPlan]:
    """Reopen the rows to retry and record the retry (and any changed options) in run.json.

    Args:
        storage: The run's storage.
        types: Error types to retry (default :data:`RETRYABLE_ERROR_TYPES`).
        all_errors: Retry every failed row, whatever its type.
        options: Serving options to change for the retry (``model``, ``max_retries``, ``api_url``, ...).
        serving: A different serving for the retry.

    Returns:
        The updated spec and what was reopened.

    Raises:
        SpecError: The run is not planned.
    """
    spec = RunSpec.load(storage)
    chosen = None if all_errors else frozenset(types or RETRYABLE_ERROR_TYPES)
    result = RetryPlan()
    for index in range(spec.shards):
        try:
            stats = storage.read_json(layout.shard_done_key(index))
        except NotFound:
            stats = None
        if stats is None:  # never finished: its rows are not processed; the shard resumes as it is
            if chosen is None or "NotProcessed" in chosen:
                pending = _unfinished_rows(storage, index)
                if pending:
                    result.shards.append(index)
                    result.rows += pending
                    result.by_type["NotProcessed"] = result.by_type.get("NotProcessed", 0) + pending
            continue
        if not stats.get("failed_offsets"):
            continue
        reopened = _reopen(storage, index, set(stats["failed_offsets"]), chosen, result)
        if reopened:
            result.shards.append(index)
    for name, value in (options or {}).items():
        if value is not None and spec.options.get(name) != value:
            result.changes[name] = [spec.options.get(name), value]
            spec.options[name] = value
    if serving and serving != spec.serving:
        result.changes["serving"] = [spec.serving, serving]
        spec.serving = serving
    spec.history.append({"action": "retry", "at": round(time.time(), 3), "rows": result.rows,
                         "errors": sorted(chosen) if chosen is not None else "all",
                         "by_type": dict(result.by_type), "changes": dict(result.changes),
                         "shards": list(result.shards)})
    spec.save(storage)
    log.info("retry: %d rows in %d shards (%s)", result.rows, len(result.shards), result.by_type)
    return spec, result


def _unfinished_rows(storage, index: int) -> int:
    """Rows of an unfinished shard that have no checkpointed result yet."""
    from dfk8s.worker.shard import read_parts, read_shard

    try:
        rows = read_shard(storage, index)
    except Exception:  # a missing shard is the reducer's to report, not the retry's
        return 0
    finished, _ = read_parts(storage, index)
    return sum(1 for r in rows if r["pos"] not in finished)


def _reopen(storage, index: int, failed: set[int], chosen: frozenset[str] | None, result: RetryPlan) -> bool:
    """Turn a finished shard back into one checkpoint part without the chosen failed rows."""
    if storage.exists(layout.shard_done_key(index)) is False:
        return False
    shard_rows = [json.loads(line) for line in storage.open_lines(layout.shard_input_key(index))
                  if line.strip()]
    outputs = [json.loads(line) for line in storage.open_lines(layout.shard_output_key(index))
               if line.strip()]
    if len(outputs) != len(shard_rows):
        raise SpecError(f"shard {index}: its output has {len(outputs)} rows, its input {len(shard_rows)}")
    kept, picked = [], 0
    for offset, (shard_row, row) in enumerate(zip(shard_rows, outputs, strict=True)):
        if offset in failed and _chosen(row.get("error"), chosen):
            picked += 1
            kind = (row.get("error") or {}).get("type") or "Error"
            result.by_type[kind] = result.by_type.get(kind, 0) + 1
            continue
        kept.append({"pos": shard_row["pos"], "id": shard_row["id"], "ok": offset not in failed, "row": row})
    if not picked:
        return False
    # Order matters for a crash in between: stale parts go, the part with what stays is written, and only
    # then the done marker goes (a shard without a marker resumes from its parts).
    for key in list(storage.list(layout.part_prefix(index))):
        storage.delete(key)
    if kept:
        storage.write_bytes(layout.part_key(index, 0), "".join(_dumps(r) + "\n" for r in kept).encode())
    storage.delete(layout.shard_done_key(index))
    storage.delete(layout.shard_output_key(index))
    result.rows += picked
    return True
