"""The reducer: assemble finished shards into one ordered result.jsonl, errors.jsonl and summary.json.

It streams shard by shard (memory stays flat however many rows there are) and never needs every shard:
a shard without a done marker is named in the summary and its rows come out marked as not processed.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field

from dfk8s import layout
from dfk8s.errors import NotFound
from dfk8s.spec import RunSpec

log = logging.getLogger(__name__)


@dataclass
class Summary:
    """What summary.json holds."""

    run_id: str
    pipeline: str
    serving: str
    rows: int = 0
    ok: int = 0
    failed: int = 0
    not_processed: int = 0
    shards: int = 0
    finished_shards: int = 0
    failed_shards: list[int] = field(default_factory=list)
    missing_shards: list[int] = field(default_factory=list)
    worker_seconds: float = 0.0
    wall_seconds: float = 0.0
    result: str = ""
    errors: str = ""
    #: Actual usage (tokens, images, requests) and cost in USD, in total and per shard (finished or not);
    #: ``cost_usd`` is None when the run's model has no price.
    usage: dict = field(default_factory=dict)
    cost_usd: float | None = None
    shard_costs: dict = field(default_factory=dict)
    #: Failed and not processed rows by error type: ``{type: {"count": n, "example": message}}``.
    errors_by_type: dict = field(default_factory=dict)

    def count_error(self, error: dict | None) -> None:
        """Count one failed row's error under its type, keeping the first message as the example."""
        error = error if isinstance(error, dict) else {}
        kind = str(error.get("type") or "Error")
        example = str(error.get("message", ""))[:500]
        entry = self.errors_by_type.setdefault(kind, {"count": 0, "example": example})
        entry["count"] += 1

    @property
    def complete(self) -> bool:
        """Every shard finished (rows may still have failed)."""
        return not self.failed_shards and not self.missing_shards


def _error_line(shard_row: dict | None, row: dict) -> str:
    entry = {"id": shard_row["id"] if shard_row else None, "pos": shard_row["pos"] if shard_row else None,
             "error": row.get("error"), "row": {k: v for k, v in row.items() if k != "error"}}
    return json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n"


def reduce_run(storage, *, failed_shards: list[int] | None = None,
               session_seconds: float | None = None) -> Summary:
    """Write result.jsonl, errors.jsonl and summary.json for the run in ``storage``.

    Args:
        storage: The run's storage.
        failed_shards: Shards the executor knows failed for good (named in the summary; their rows
            are marked not processed like any unfinished shard's).
        session_seconds: How long the current launcher session has worked. With it, ``wall_seconds``
            is the time worked (earlier sessions from run.json's history plus this one), not the pause
            between an interrupt and a resume; without it (a cluster's reducer), the time since planning.

    Returns:
        The summary.
    """
    spec = RunSpec.load(storage)
    summary = Summary(spec.run_id, spec.pipeline, spec.serving, shards=spec.shards)
    known_failed = set(failed_shards or ())
    done_stats: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="dfk8s-reduce-") as tmp:
        result_path, errors_path = os.path.join(tmp, "result.jsonl"), os.path.join(tmp, "errors.jsonl")
        with open(result_path, "wb") as result, open(errors_path, "w", encoding="utf-8") as errors:
            for index in range(spec.shards):
                try:
                    stats = storage.read_json(layout.shard_done_key(index))
                except NotFound:
                    stats = None
                if stats is not None:
                    done_stats[index] = stats
                    _copy_finished(storage, index, stats, result, errors, summary)
                else:
                    _mark_unprocessed(storage, index, index in known_failed, result, errors, summary)
        storage.write_file(layout.RESULT_KEY, result_path)
        storage.write_file(layout.ERRORS_KEY, errors_path)
    _add_costs(storage, spec, summary, done_stats)
    if session_seconds is not None:
        worked = sum(float(entry.get("seconds", 0.0)) for entry in spec.history if isinstance(entry, dict))
        summary.wall_seconds = round(worked + session_seconds, 3)
    else:
        summary.wall_seconds = round(time.time() - spec.created_at, 3)
    summary.result, summary.errors = storage.url(layout.RESULT_KEY), storage.url(layout.ERRORS_KEY)
    storage.write_json(layout.SUMMARY_KEY, {**summary.__dict__, "complete": summary.complete})
    log.info("reduced %d rows: %d ok, %d failed, %d not processed", summary.rows, summary.ok,
             summary.failed, summary.not_processed)
    return summary


def _add_costs(storage, spec: RunSpec, summary: Summary, done_stats: dict[int, dict]) -> None:
    """Sum every shard's spend (a shard that stopped early was paid for too) into the summary."""
    from dfk8s.budget import read_cost_record, shard_cost
    from dfk8s.usage import Usage

    if read_cost_record(storage) is None:
        return  # no price known for the run's model (or a serving without one): nothing is counted
    total, usd = Usage(), 0.0
    for index in range(spec.shards):
        stats = done_stats.get(index)
        if stats is not None:
            spent = {"usage": stats.get("usage") or {}, "cost_usd": float(stats.get("cost_usd") or 0.0)}
        else:
            spent = shard_cost(storage, index)
        if spent is None:
            continue
        summary.shard_costs[str(index)] = spent
        total.add(Usage.from_dict(spent["usage"]))
        usd += spent["cost_usd"]
    summary.usage, summary.cost_usd = total.to_dict(), round(usd, 6)


def _copy_finished(storage, index, stats, result, errors, summary: Summary) -> None:
    failed = set(stats.get("failed_offsets", ()))
    shard_rows = None
    if failed:  # ids and positions for errors.jsonl come from the input shard
        shard_rows = [json.loads(line) for line in storage.open_lines(layout.shard_input_key(index))]
    count = 0
    for offset, line in enumerate(storage.open_lines(layout.shard_output_key(index))):
        result.write(line + b"\n")
        if offset in failed:
            row = json.loads(line)
            errors.write(_error_line(shard_rows[offset] if shard_rows else None, row))
            summary.count_error(row.get("error"))
        count += 1
    summary.rows += count
    summary.failed += len(failed)
    summary.ok += count - len(failed)
    summary.finished_shards += 1
    summary.worker_seconds += float(stats.get("seconds", 0.0))


def _mark_unprocessed(storage, index, known_failed: bool, result, errors, summary: Summary) -> None:
    try:
        lines = storage.open_lines(layout.shard_input_key(index))
        first = next(lines, None)
    except NotFound:
        summary.missing_shards.append(index)
        log.error("shard %d has neither output nor input; its rows cannot be listed", index)
        return
    summary.failed_shards.append(index)
    reason = "its shard failed" if known_failed else "its shard did not finish"
    count = 0
    for line in _chain(first, lines):
        if not line.strip():
            continue
        try:
            shard_row = json.loads(line)
            row = dict(shard_row["row"])
            error = {"type": "NotProcessed", "message": f"shard {index}: {reason}", "attempts": 0,
                     "shard": index}
        except (ValueError, KeyError, TypeError):  # a corrupt shard line still keeps its place
            shard_row, row = None, {}
            error = {"type": "NotProcessed", "message": f"shard {index}: {reason}; its input line is corrupt",
                     "attempts": 0, "shard": index, "raw": line[:500].decode("utf-8", "replace")}
        row["error"] = error
        text = json.dumps(row, ensure_ascii=False, separators=(",", ":"))
        result.write(text.encode() + b"\n")
        errors.write(_error_line(shard_row, row))
        summary.count_error(row["error"])
        count += 1
    summary.rows += count
    summary.not_processed += count


def _chain(first, rest):
    if first is not None:
        yield first
    yield from rest
