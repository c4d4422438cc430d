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

from dfk8s.errors import NotFound
from dfk8s.run import layout
from dfk8s.run.spec import RunSpec

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
    #: ``--max-cost`` and whether it stopped the run: ``{"max_cost", "stopped_shards"}`` (empty without one).
    budget: dict = field(default_factory=dict)
    #: Seconds the launcher session that reduced worked (None: a cluster's reducer); ``wall_seconds`` is
    #: the whole run's.
    session_seconds: float | None = None
    #: A self-hosted engine's throughput: start-up seconds, GPUs per worker, GPU-seconds, and rows and
    #: images per GPU-second (per worker-second on CPUs); empty for other servings.
    self_hosted: dict = field(default_factory=dict)
    #: FLUX's speed settings (compile, step_cache, fp8, exact: False when a lossy option made the images)
    #: and how its workers started: compiled, or from the compile cache; empty for other servings.
    flux: dict = field(default_factory=dict)

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


def reduce_run(storage, *, failed_shards: list[int] | dict[int, str] | None = None,
               session_seconds: float | None = None) -> Summary:
    """Write result.jsonl, errors.jsonl and summary.json for the run in ``storage``.

    Args:
        storage: The run's storage.
        failed_shards: Shards the executor knows failed for good (named in the summary; their rows
            are marked not processed like any unfinished shard's), with why where it knows (a dict).
        session_seconds: How long the current launcher session has worked. With it, ``wall_seconds``
            is the time worked (earlier sessions from run.json's history plus this one), not the pause
            between an interrupt and a resume; without it (a cluster's reducer), the time since planning.

    Returns:
        The summary.
    """
    spec = RunSpec.load(storage)
    summary = Summary(spec.run_id, spec.pipeline, spec.serving, shards=spec.shards)
    known_failed = (dict(failed_shards) if isinstance(failed_shards, dict)
                    else dict.fromkeys(failed_shards or (), ""))
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
                    _mark_unprocessed(storage, index, known_failed.get(index), result, errors, summary)
        storage.write_file(layout.RESULT_KEY, result_path)
        storage.write_file(layout.ERRORS_KEY, errors_path)
    _add_costs(storage, spec, summary, done_stats)
    if session_seconds is not None:
        worked = sum(float(entry.get("seconds", 0.0)) for entry in spec.history if isinstance(entry, dict))
        summary.wall_seconds = round(worked + session_seconds, 3)
        summary.session_seconds = round(session_seconds, 3)
    else:
        summary.wall_seconds = round(time.time() - spec.created_at, 3)
    summary.result, summary.errors = storage.url(layout.RESULT_KEY), storage.url(layout.ERRORS_KEY)
    storage.write_json(layout.SUMMARY_KEY, {**summary.__dict__, "complete": summary.complete})
    log.info("reduced %d rows: %d ok, %d failed, %d not processed", summary.rows, summary.ok,
             summary.failed, summary.not_processed)
    return summary


def _add_costs(storage, spec: RunSpec, summary: Summary, done_stats: dict[int, dict]) -> None:
    """Sum every shard's usage and spend (a shard that stopped early was paid for too) into the summary.

    Usage (tokens, images, requests) is counted whatever the model; the cost only where the price table
    knows it (``cost_usd`` None otherwise, never a made-up $0).
    """
    from dfk8s.cost.budget import read_cost_record, shard_cost
    from dfk8s.cost.usage import Usage

    record = read_cost_record(storage) or {}
    priced = record.get("price") is not None
    if record.get("max_cost") is not None:
        stopped = [index for index in range(spec.shards) if (shard_cost(storage, index) or {}).get("stopped")]
        summary.budget = {"max_cost": record["max_cost"], "stopped_shards": stopped}
    total, usd, counted = Usage(), 0.0, False
    for index in range(spec.shards):
        stats = done_stats.get(index)
        if stats is not None:
            spent = {"usage": stats.get("usage") or {}, "cost_usd": stats.get("cost_usd")}
        else:
            spent = shard_cost(storage, index)
        if spent is None or not (spent["usage"] or spent["cost_usd"]):
            continue
        counted = True
        if priced:
            spent["cost_usd"] = float(spent["cost_usd"] or 0.0)
            summary.shard_costs[str(index)] = spent
            usd += spent["cost_usd"]
        total.add(Usage.from_dict(spent["usage"]))
    if counted or priced:
        summary.usage = total.to_dict()
    summary.cost_usd = round(usd, 6) if priced else None


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
    engine = stats.get("engine")
    if isinstance(engine, dict):
        add_engine_share(summary.self_hosted, engine, float(stats.get("seconds", 0.0)),
                         int(stats.get("ok", 0)))
    if isinstance(stats.get("flux"), dict):
        add_flux_share(summary.flux, stats["flux"])


def add_flux_share(totals: dict, flux: dict) -> None:
    """Add one finished shard's FLUX report: the settings, and its worker's compile counted once."""
    for name in ("compile", "step_cache", "fp8"):
        totals[name] = flux.get(name)
    # One shard made with a lossy option makes the run's images inexact.
    totals["exact"] = bool(totals.get("exact", True)) and bool(flux.get("exact", True))
    if flux.get("worker") in ("compiled", "cache"):
        name = "workers_compiled" if flux["worker"] == "compiled" else "workers_from_cache"
        totals[name] = totals.get(name, 0) + 1
        totals["compile_seconds"] = round(totals.get("compile_seconds", 0.0)
                                          + float(flux.get("compile_seconds") or 0.0), 3)
        for count in ("graphs_compiled", "graphs_loaded"):
            totals[count] = totals.get(count, 0) + int(flux.get(count) or 0)


def add_engine_share(totals: dict, engine: dict, seconds: float, ok: int) -> None:
    """Add one finished shard's engine figures to the run's ``self_hosted`` block (rates recomputed)."""
    gpus = int(engine.get("gpus") or 0)
    totals["engine"] = engine.get("engine")
    totals["gpus_per_worker"] = max(gpus, totals.get("gpus_per_worker", 0))
    totals["engine_startup_seconds"] = round(totals.get("engine_startup_seconds", 0.0)
                                             + float(engine.get("startup_seconds") or 0.0), 3)
    totals["rows"] = totals.get("rows", 0) + ok
    totals["images"] = totals.get("images", 0) + int(engine.get("images") or 0)
    totals["worker_seconds"] = round(totals.get("worker_seconds", 0.0) + seconds, 3)
    per = "gpu_second" if gpus else "worker_second"
    spent = totals["worker_seconds"] * (gpus or 1)
    if gpus:
        totals["gpu_seconds"] = round(spent, 3)
    if spent > 0:
        totals[f"rows_per_{per}"] = round(totals["rows"] / spent, 4)
        totals[f"images_per_{per}"] = round(totals["images"] / spent, 4)


def _mark_unprocessed(storage, index, failed: str | None, result, errors, summary: Summary) -> None:
    """An unfinished shard: its checkpointed rows come out as they finished, the others as not processed.

    Those rows were sent and paid for: counting them as not processed would make summary.json disagree
    with ``status`` and send them again on a retry.
    """
    from dfk8s.worker.shard import read_parts

    try:
        lines = storage.open_lines(layout.shard_input_key(index))
        first = next(lines, None)
    except NotFound:
        summary.missing_shards.append(index)
        log.error("shard %d has neither output nor input; its rows cannot be listed", index)
        return
    summary.failed_shards.append(index)
    finished, _ = read_parts(storage, index)
    reason = "its shard did not finish" if failed is None else "its shard failed" + (
        f": {failed[:300]}" if failed else "")
    count = 0
    for line in _chain(first, lines):
        if not line.strip():
            continue
        try:
            shard_row = json.loads(line)
            done = finished.get(shard_row["pos"])
            if done is not None:
                row = done["row"]
                result.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
                count += 1
                if done["ok"]:
                    summary.ok += 1
                else:
                    summary.failed += 1
                    errors.write(_error_line(shard_row, row))
                    summary.count_error(row.get("error"))
                continue
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
        summary.not_processed += 1
        count += 1
    summary.rows += count


def _chain(first, rest):
    if first is not None:
        yield first
    yield from rest
