"""Build a run's report: sample result.jsonl, make thumbnails, render report.html, write it where it belongs.

- A local run gets ``report.html`` and ``report/thumbs/`` inside its folder; images are linked by relative
  path, so the page works offline, opened from the file system.
- An S3 run gets the same files on S3 (the page there links its thumbnails and images by presigned URLs,
  so the printed presigned URL works in any browser), and, unless ``presign_only``, a local copy whose
  thumbnails were downloaded into its ``report/thumbs/`` (offline, like a local run's).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from dfk8s.errors import Dfk8sError, NotFound, RunNotFound
from dfk8s.inputs import rows
from dfk8s.pipelines import get_pipeline
from dfk8s.report._inputs import input_refs
from dfk8s.report._links import DEFAULT_EXPIRES, THUMBS_PREFIX, Presigner, local_href, put, write_thumbs
from dfk8s.report._sample import Counts, count_error_types, count_rows, sample_rows
from dfk8s.report._thumbs import make_thumbs
from dfk8s.run import layout
from dfk8s.run.spec import RunSpec

log = logging.getLogger(__name__)

REPORT_KEY = layout.REPORT_KEY
DEFAULT_ROWS = 500
_TEXT_LIMIT = 4000


@dataclass
class ReportResult:
    """Where the report went and what it shows."""

    path: str | None  # the local report.html (None for an S3 run with presign_only)
    s3_uri: str | None = None  # s3://.../report.html for S3 runs
    url: str | None = None  # a presigned https URL of the S3 report.html
    rows: int = 0
    shown: int = 0
    shown_failed: int = 0
    seconds: float = 0.0
    thumbs: int = 0
    missing_images: int = 0


@dataclass
class ImageCell:
    """One image on a card: a thumbnail (or why there is none) linked to the full image."""

    ref: str
    thumb: str | None = None  # thumbnail file name under report/thumbs/
    problem: str | None = None
    width: int = 0
    height: int = 0
    src: str | None = None  # filled per target page
    href: str | None = None


@dataclass
class Card:
    """One row of the gallery."""

    pos: int
    row_id: str
    ok: bool
    turns: list[tuple[str, str]]
    inputs: list[ImageCell] = field(default_factory=list)
    outputs: list[ImageCell] = field(default_factory=list)
    text: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    error_attempts: int | None = None


def write_report(
    storage,
    *,
    rows_wanted: int = DEFAULT_ROWS,
    presign_only: bool = False,
    local_dir: str | os.PathLike | None = None,
    endpoint_url: str | None = None,
    expires: int = DEFAULT_EXPIRES,
) -> ReportResult:
    """Write the report of the run in ``storage`` (a local folder or an S3 prefix).

    Args:
        storage: The run's storage.
        rows_wanted: The most rows the gallery shows (``--rows``).
        presign_only: S3 runs: write only the S3 copy (images by presigned URLs), no local copy.
        local_dir: S3 runs: the folder of the local copy (default ``./report-<run_id>``).
        endpoint_url: S3 endpoint.
        expires: Seconds the presigned URLs stay valid.

    Returns:
        Where the report is and what it shows.

    Raises:
        RunNotFound: No run.json there.
        Dfk8sError: The run has no result.jsonl yet.
    """
    started = time.monotonic()
    try:
        spec = RunSpec.from_dict(storage.read_json(layout.RUN_SPEC_KEY))
    except NotFound:
        raise RunNotFound(f"no run at {storage.url()} (no {layout.RUN_SPEC_KEY})") from None
    if not storage.exists(layout.RESULT_KEY):
        raise Dfk8sError(
            f"run {spec.run_id} has no {layout.RESULT_KEY} yet: it is not reduced "
            f"(dfk8s reduce {storage.url()})"
        )
    try:
        summary = storage.read_json(layout.SUMMARY_KEY)
    except NotFound:
        summary = {}
    if all(isinstance(summary.get(k), int) for k in ("ok", "failed", "not_processed")):
        counts = Counts(ok=summary["ok"], failed=summary["failed"] + summary["not_processed"])
        try:  # the failed rows alone, to share the sample fairly between error types
            types = count_error_types(storage.open_lines(layout.ERRORS_KEY)) if counts.failed else None
        except (NotFound, ValueError):
            types = None
    else:
        counts, types = count_rows(storage.open_lines(layout.RESULT_KEY))
    sample = sample_rows(storage.open_lines(layout.RESULT_KEY), rows_wanted, counts, types)
    pipeline = get_pipeline(spec.pipeline)
    refs_by_pos = (
        input_refs(storage, spec.rows_per_shard, [pos for pos, _ in sample.rows])
        if pipeline.uses_images
        else {}
    )
    cards = [_card(pos, row, spec, pipeline, refs_by_pos) for pos, row in sample.rows]
    endpoint = endpoint_url or getattr(storage, "endpoint_url", None)
    cells = [cell for card in cards for cell in (*card.inputs, *card.outputs) if cell.problem is None]
    thumbs = make_thumbs([c.ref for c in cells], run_storage=storage, endpoint_url=endpoint)
    for cell in cells:
        thumb = thumbs[cell.ref]
        cell.width, cell.height = thumb.width, thumb.height
        # The ref is under the image already: keep the reason ("not found", "does not decode: ...").
        cell.problem = thumb.problem.replace(f"image {cell.ref} ", "") if thumb.problem else None
        cell.thumb = thumb.name if thumb.data else None
    from dfk8s.cost.budget import read_cost_record

    page = _page_facts(spec, summary, sample, counts, cards, rows_wanted, read_cost_record(storage))
    result = ReportResult(
        path=None,
        rows=sample.seen.rows,
        shown=len(cards),
        shown_failed=sum(not c.ok for c in cards),
        thumbs=sum(1 for t in thumbs.values() if t.data),
        missing_images=sum(1 for card in cards for c in (*card.inputs, *card.outputs) if c.problem),
    )
    from dfk8s.report._render import render

    if storage.uri.startswith("s3://"):
        presigner = Presigner(storage, endpoint or storage.endpoint_url, expires)
        write_thumbs(storage, thumbs, s3=True)
        s3_page = render(
            page,
            _linked(
                cards, thumb_src=lambda n: presigner.run_url(f"{THUMBS_PREFIX}/{n}"), href=presigner.href
            ),
        )
        put(storage, REPORT_KEY, s3_page, "text/html; charset=utf-8")
        result.s3_uri = storage.url(REPORT_KEY)
        result.url = presigner.run_url(REPORT_KEY)
        if not presign_only:
            from dfk8s.storage import LocalStorage

            local = LocalStorage(local_dir or f"report-{spec.run_id}")
            result.path = _write_local_page(local, Path(local.root), page, cards, thumbs, storage, presigner)
    else:
        presigner = Presigner(None, endpoint, expires)  # its client is made only if an input is on S3
        result.path = _write_local_page(storage, Path(storage.url()), page, cards, thumbs, storage, presigner)
    result.seconds = round(time.monotonic() - started, 3)
    log.info(
        "report of run %s: %d of %d rows in %.1fs", spec.run_id, result.shown, result.rows, result.seconds
    )
    return result


# ----- cards ------------------------------------------------------------------------------------------


def _clip(text: str) -> str:
    return text if len(text) <= _TEXT_LIMIT else text[:_TEXT_LIMIT] + f"… ({len(text):,} characters)"


def _turns(row: dict, spec: RunSpec) -> list[tuple[str, str]]:
    try:
        turns = get_pipeline(spec.pipeline).check_row(row, spec.input_key, spec.option("prompt"),
                                                      own_text=spec.own_text)
    except rows.RowProblem:
        error = row.get("error")
        raw = error.get("raw") if isinstance(error, dict) else None
        return [("raw", _clip(str(raw)))] if raw else []
    return [
        (t.role, _clip(rows.strip_image_placeholders(t.text) or t.text)) for t in turns if t.role != "system"
    ]


def _card(pos: int, row: dict, spec: RunSpec, pipeline, refs_by_pos: dict[int, list[str]]) -> Card:
    import json

    error = row.get("error") if isinstance(row.get("error"), dict) else None
    row_id = str(row.get(spec.id_key, pos)) if spec.id_key else str(pos)
    card = Card(pos=pos, row_id=row_id, ok=error is None and "error" not in row, turns=_turns(row, spec))
    if pipeline.uses_images:
        card.inputs = [ImageCell(ref) for ref in refs_by_pos.get(pos) or ()]
        if not card.inputs:  # not resolved at plan time (a bad row) or no input shard: the row's own refs
            try:
                raw = rows.image_refs(row, spec.image_key)
            except rows.RowProblem:
                raw = []
            card.inputs = [
                ImageCell(ref)
                if "://" in ref or os.path.isabs(ref)
                else ImageCell(ref, problem="not found (see the error)")
                for ref in raw
            ]
    output_key = spec.output_key or pipeline.output_key
    value = row.get(output_key)
    if card.ok and pipeline.output_kind == "images":
        # A local run names its outputs relative to its folder (result.jsonl resolves wherever it is copied).
        card.outputs = [ImageCell(v if "://" in v or os.path.isabs(v) else layout.RUN_REF_SCHEME + v)
                        for v in (value or ()) if isinstance(v, str) and v]
    elif card.ok and value is not None:
        card.text = _clip(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
    if not card.ok:
        card.error_type = str((error or {}).get("type") or "Error")
        card.error_message = _clip(str((error or {}).get("message") or row.get("error")))
        attempts = (error or {}).get("attempts")
        card.error_attempts = attempts if isinstance(attempts, int) and attempts > 0 else None
    return card


def _linked(cards: list[Card], *, thumb_src, href) -> list[Card]:
    for card in cards:
        for cell in (*card.inputs, *card.outputs):
            cell.src = thumb_src(cell.thumb) if cell.thumb else None
            cell.href = href(cell.ref)
    return cards


# ----- header facts -----------------------------------------------------------------------------------


def _page_facts(spec: RunSpec, summary: dict, sample, counts: Counts, cards: list[Card], wanted: int,
                cost_record: dict | None = None) -> dict:
    not_processed = summary.get("not_processed", sample.error_types.get("NotProcessed", 0))
    failed = summary.get("failed", sample.seen.failed - not_processed)
    total = summary.get("rows", sample.seen.rows)
    wall, work = summary.get("wall_seconds"), summary.get("worker_seconds")
    timings = [("started", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(spec.created_at)))]
    if isinstance(wall, (int, float)):
        timings.append(("wall time", _duration(wall)))
        if wall > 0 and total:
            rate = total / wall
            timings.append(
                ("throughput", f"{rate:,.1f} rows/s" if rate >= 1 else f"{rate * 60:,.1f} rows/min")
            )
    if isinstance(work, (int, float)):
        timings.append(("worker time", _duration(work)))
    shown_failed = sum(not c.ok for c in cards)
    if len(cards) < sample.seen.rows:
        note = (
            f"Showing {len(cards):,} of {sample.seen.rows:,} rows: "
            + (
                f"{shown_failed:,} of the {sample.seen.failed:,} failed rows first"
                + (" (shared fairly between error types)" if shown_failed < sample.seen.failed else "")
                + ", then "
                if sample.seen.failed
                else ""
            )
            + f"{len(cards) - shown_failed:,} rows spread evenly over the input, in input order "
            f"(dfk8s report --rows N to change; now {wanted:,})."
        )
    else:
        note = f"Showing all {len(cards):,} rows, in input order."
    by_type_cards: dict[str, int] = {}
    for card in cards:
        if card.error_type:
            by_type_cards[card.error_type] = by_type_cards.get(card.error_type, 0) + 1
    return {
        "run_id": spec.run_id,
        "pipeline": spec.pipeline,
        "serving": spec.serving,
        "model": spec.option("model") or "",
        "lossy_options": _lossy_options(spec),
        "input": spec.input,
        "counts": {
            "rows": total,
            "ok": summary.get("ok", sample.seen.ok),
            "failed": failed,
            "not_processed": not_processed,
        },
        "timings": timings,
        "cost": _cost_facts(summary, cost_record),
        "failed_shards": summary.get("failed_shards") or [],
        "missing_shards": summary.get("missing_shards") or [],
        "complete": summary.get("complete"),
        "error_types": sorted(sample.error_types.items(), key=lambda kv: (-kv[1], kv[0])),
        "sample_error_types": by_type_cards,
        "note": note,
        "cards": cards,
        "shown_ok": len(cards) - shown_failed,
        "shown_failed": shown_failed,
        "generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def _lossy_options(spec: RunSpec) -> list[str]:
    """The lossy speed-ups the run's images were made with (FLUX's step cache, fp8), tagged in the header."""
    from dfk8s.servings.flux_speed import Speed

    step_cache = spec.option("step_cache")
    return Speed(step_cache=float(step_cache) if step_cache else None, fp8=bool(spec.option("fp8"))).lossy()


def _cost_facts(summary: dict, record: dict | None = None) -> list[tuple[str, str]]:
    """The money in dollars (spent, estimate, budget, whether the budget stopped the run), then usage.

    Usage (tokens, images, requests) is kept even where no price is known.
    """
    from dfk8s.cost.pricing import usd

    facts: list[tuple[str, str]] = []
    record = record or {}
    usage = summary.get("usage") or {}
    cost = summary.get("cost_usd")
    if cost is not None:
        facts.append(("spent", usd(cost)))
    elif usage:
        facts.append(("spent", f"not priced (no price known for {record.get('model') or 'its model'})"))
    estimate = record.get("estimate") or {}
    if estimate.get("api_mode"):
        mode = estimate["api_mode"]
        price = estimate["batch_usd" if mode == "batch" else "sync_usd"]
        facts.append(("estimate", f"{usd(price)} ({mode})"))
    budget = summary.get("budget") or {}
    if budget.get("max_cost") is not None:
        facts.append(("budget", f"--max-cost {usd(budget['max_cost'])}"))
        stopped = budget.get("stopped_shards") or []
        facts.append(("stopped by the budget", f"yes: shards {', '.join(map(str, stopped))} stopped at "
                      "their share; resume with a higher --max-cost" if stopped else "no"))
    if usage.get("estimated"):
        facts.append(("priced from the request", f"{usage['estimated']:,} answers came without usage"))
    for key, label in (("input_tokens", "input tokens"), ("output_tokens", "output tokens"),
                       ("images", "images"), ("requests", "requests")):
        if usage.get(key):
            facts.append((label, f"{usage[key]:,}"))
    return facts


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _write_local_page(target, html_dir: Path, page, cards, thumbs, storage, presigner) -> str:
    """Write the page and its thumbnails into the local folder ``target``; returns the page's path.

    Thumbnails are linked relative to the page, the run's images relative to ``html_dir`` (S3 inputs
    presigned).
    """
    from dfk8s.report._render import render

    write_thumbs(target, thumbs, s3=False)
    target.write_bytes(REPORT_KEY, render(page, _linked(
        cards, thumb_src=lambda n: f"{THUMBS_PREFIX}/{n}",
        href=lambda ref: local_href(ref, html_dir, storage, presigner))))
    return target.url(REPORT_KEY)
