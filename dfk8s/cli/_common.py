"""What the commands share: one-line messages, the launchers' flags, the summary they print."""

from __future__ import annotations

import os

import click

#: ``--s3-endpoint`` of every command that reads or writes a run's storage.
s3_endpoint_option = click.option("--s3-endpoint", envvar="AWS_ENDPOINT_URL",
                                  help="S3-compatible endpoint URL (default: $AWS_ENDPOINT_URL).")


def err(message: str) -> None:
    """Print one line on stderr (the commands' messages; stdout is for results)."""
    click.echo(message, err=True)


def lifecycle_options(func):
    """Flags of the launchers (``run``, ``retry``) that are not part of the run spec."""
    options = [
        click.option("--output", "-o", default="./runs", show_default=True, metavar="DIR|S3URI",
                     help="Where runs live: a local folder or s3://bucket/prefix."),
        click.option("--workers", "-w", type=click.IntRange(min=1), default=4, show_default=True,
                     help="Long-lived worker processes (never more than shards left); each builds its "
                          "serving once and takes shard after shard."),
        click.option("--shard-retries", type=click.IntRange(min=0), default=2, show_default=True,
                     help="Extra attempts for a shard whose worker crashes (like backoffLimitPerIndex)."),
        click.option("--storage-patience", type=click.FloatRange(min=0), default=120.0, show_default=True,
                     envvar="DFK8S_STORAGE_PATIENCE",
                     help="Seconds a storage outage is retried (with backoff) before the run stops."),
        click.option("--grace", type=click.FloatRange(min=0), default=20.0, show_default=True,
                     envvar="DFK8S_GRACE_SECONDS",
                     help="On Ctrl-C/SIGTERM: seconds requests in flight get to finish before the "
                          "workers checkpoint and stop."),
        click.option("--max-failed-fraction", type=click.FloatRange(min=0, max=1), default=1.0,
                     show_default=True,
                     help="Exit non-zero when more than this fraction of rows failed (a run where every "
                          "row failed always does)."),
        click.option("--progress/--no-progress", default=True,
                     help="Show the progress bar (only on a terminal)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def launcher_env(storage_patience: float, grace: float) -> None:
    # Workers inherit these: the same patience and grace in every process of the run.
    os.environ["DFK8S_STORAGE_PATIENCE"] = f"{storage_patience:g}"
    os.environ["DFK8S_GRACE_SECONDS"] = f"{grace:g}"


def plural(count: int, noun: str) -> str:
    """``1 shard``, ``2 shards``: a count with its noun."""
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def finish(summary, max_failed_fraction: float, report=None, output: str | None = None) -> None:
    """Print the summary, then call ``report``; exit non-zero when shards failed or too many rows did.

    Where rows failed for reasons a retry can fix, the summary names the one command that re-runs them
    (``output``: the run's --output, for that command).
    """
    print_summary(summary)
    retryable = _retryable_rows(summary)
    if retryable and output is not None:
        err(f"{plural(retryable, 'row')} failed for reasons that can pass (rate limits, timeouts, server "
            f"errors, not processed): re-run just them with: dfk8s retry {summary.run_id} -o {output}")
    if report is not None:
        report()
    if not summary.complete:
        raise click.exceptions.Exit(1)
    failed_fraction = summary.failed / summary.rows if summary.rows else 0.0
    if summary.rows and (summary.failed == summary.rows or failed_fraction > max_failed_fraction):
        what = (f"every row failed ({summary.failed})" if summary.failed == summary.rows else
                f"{summary.failed} of {summary.rows} rows failed, more than --max-failed-fraction "
                f"{max_failed_fraction:g}")
        err(f"error: {what}; see {summary.errors}")
        raise click.exceptions.Exit(1)


def _retryable_rows(summary) -> int:
    from dfk8s.reduce.reopen import RETRYABLE_ERROR_TYPES

    by_type = getattr(summary, "errors_by_type", {}) or {}
    return sum(entry["count"] for kind, entry in by_type.items() if kind in RETRYABLE_ERROR_TYPES)


def print_summary(summary) -> None:
    """The summary line (counts, time, cost), the errors by type, and result.jsonl's location on stdout."""
    session = getattr(summary, "session_seconds", None)
    took = (f" in {session:.1f}s (this session; {summary.wall_seconds:.1f}s for the run in all)"
            if session is not None and abs(session - summary.wall_seconds) >= 0.05 else
            f" in {summary.wall_seconds:.1f}s")
    failed_shards = summary.failed_shards
    named = ", ".join(map(str, failed_shards[:10])) + (", ..." if len(failed_shards) > 10 else "")
    line = (f"{plural(summary.rows, 'row')}: {summary.ok:,} ok, {summary.failed:,} failed"
            + (f", {summary.not_processed:,} not processed ({plural(len(failed_shards), 'shard')} did not "
               f"finish: {named})" if summary.not_processed or failed_shards else "")
            + took)
    if getattr(summary, "cost_usd", None) is not None:
        usage = summary.usage or {}
        from dfk8s.cost.pricing import usd

        line += (f"; cost {usd(summary.cost_usd)} ({usage.get('input_tokens', 0):,} input / "
                 f"{usage.get('output_tokens', 0):,} output tokens"
                 + (f", {usage['images']:,} images" if usage.get("images") else "") + ")")
    elif (usage := getattr(summary, "usage", None) or {}).get("requests"):
        line += (f"; {usage.get('input_tokens', 0):,} input / {usage.get('output_tokens', 0):,} output "
                 "tokens (no price known for the model)")
    err(line)
    by_type = sorted(getattr(summary, "errors_by_type", {}).items(), key=lambda kv: -kv[1]["count"])
    for kind, entry in by_type[:8]:
        err(f"  {kind}: {plural(entry['count'], 'row')}, e.g. {entry['example'][:200]}")
    if len(by_type) > 8:
        err(f"  ... and {len(by_type) - 8} more error types (summary.json)")
    click.echo(summary.result)


