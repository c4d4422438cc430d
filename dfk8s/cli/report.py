"""``dfk8s report``, and the ``--report`` flag of ``run`` / ``submit --wait``; ``dfk8s.cli`` adds them."""

from __future__ import annotations

import click

from dfk8s.cli._common import err, s3_endpoint_option

__all__ = ["report", "report_option", "after_run"]



def report_option(func):
    """``--report``: write the run's report when it ends (else the command to do so is printed)."""
    return click.option(
        "--report",
        "write_report_after",
        is_flag=True,
        help="When the run ends (submit: with --wait), write its HTML report (dfk8s report) and print "
        "where; without it, the dfk8s report command is printed.",
    )(func)


def _run_storage(run: str, output: str | None, endpoint_url: str | None):
    from dfk8s.plan.launch import run_storage
    from dfk8s.storage import open_storage

    if output is None and (run.startswith("s3://") or "/" in run):
        return open_storage(run.rstrip("/"), endpoint_url=endpoint_url)  # RUN is the run's own location
    return run_storage(output or "./runs", run, endpoint_url)


def _show(result) -> None:
    err(
        f"report: {result.shown:,} of {result.rows:,} rows ({result.shown_failed:,} failed), "
        f"{result.thumbs:,} thumbnails"
        + (f", {result.missing_images:,} images missing" if result.missing_images else "")
        + f", in {result.seconds:.1f}s"
    )
    if result.path:
        click.echo(result.path)
    if result.s3_uri:
        err("on S3 (the presigned URL works in any browser until it expires):")
        click.echo(result.s3_uri)
        click.echo(result.url)


def after_run(
    write_it: bool, run_uri: str, run_id: str, output: str, endpoint_url: str | None = None
) -> None:
    """End of ``dfk8s run`` / ``submit --wait``: write the report, or print the command that writes it."""
    if not write_it:
        err(f"report: dfk8s report {run_id} --output {output}")
        return
    from dfk8s.errors import Dfk8sError
    from dfk8s.report import write_report
    from dfk8s.storage import open_storage

    try:
        _show(write_report(open_storage(run_uri, endpoint_url=endpoint_url), endpoint_url=endpoint_url))
    except Dfk8sError as exc:  # the run itself is done: its exit code stays the run's
        err(f"report not written: {exc}; try again with: dfk8s report {run_id} --output {output}")


@click.command()
@click.argument("run", metavar="RUN")
@click.option(
    "--output",
    "-o",
    metavar="DIR|S3URI",
    help="Where runs live (default ./runs); without it, RUN may also be the run's own folder or "
    "s3:// URI. Kubernetes runs: their s3:// --output.",
)
@click.option(
    "--rows",
    "rows_wanted",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Most rows in the gallery: every failed row first (up to half), the rest spread evenly.",
)
@click.option(
    "--presign",
    is_flag=True,
    help="S3 runs: only the copy on S3, its images by presigned URLs; no local copy.",
)
@click.option(
    "--dest",
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="S3 runs: the folder of the local copy, thumbnails downloaded (default ./report-RUN).",
)
@click.option(
    "--expires",
    type=click.IntRange(min=60, max=7 * 24 * 3600),
    default=7 * 24 * 3600,
    show_default=True,
    help="S3 runs: seconds the presigned URLs stay valid (at most 7 days).",
)
@s3_endpoint_option
def report(run, output, rows_wanted, presign, dest, expires, s3_endpoint):
    """Write RUN's report.html: counts, timings, cost, errors by type, and a gallery of its rows.

    Each card shows the prompt or question, the input and output images (thumbnails linked to the full
    images) or the caption or answer, and the error of a failed row. Filters (ok, failed, each error
    type) and a text search work without a server; the page fetches nothing and works offline.

    A local run's report goes into the run's folder. An S3 run's goes onto S3 beside it (printed as a
    presigned https URL) and, unless --presign, into a local folder too (thumbnails downloaded).

    \b
    Example:
      dfk8s report 20261201-120000-3f9a2c --output ./runs
      dfk8s report 20261201-120000-3f9a2c --output s3://bucket/runs --rows 1000
    """
    from dfk8s.report import write_report

    storage = _run_storage(run, output, s3_endpoint)
    _show(
        write_report(
            storage,
            rows_wanted=rows_wanted,
            presign_only=presign,
            local_dir=dest,
            endpoint_url=s3_endpoint,
            expires=expires,
        )
    )
