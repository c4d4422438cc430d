"""The ``dfk8s`` command line: each command checks its flags, calls the library, prints."""

from __future__ import annotations

import os
import sys

import click

from dfk8s import __version__
from dfk8s.cli_report import after_run, report_option
from dfk8s.cli_report import report as report_command
from dfk8s.errors import Dfk8sError
from dfk8s.log import setup_logging
from dfk8s.options import run_request_from_flags, shared_run_options


def _err(message: str) -> None:
    click.echo(message, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="dfk8s")
@click.option("--log-level", envvar="DFK8S_LOG_LEVEL", default=None,
              help="Log level (default WARNING; workers INFO). DFK8S_DEBUG=1 shows tracebacks.")
def cli(log_level):
    """Run multimodal data pipelines (caption, VQA, text-to-image, image editing) on JSON/JSONL manifests.

    \b
    dfk8s run       run a pipeline on this machine (local processes; a local folder or S3)
    dfk8s validate  check a manifest without running anything
    dfk8s worker    process one shard (what each local process or Kubernetes pod runs)
    dfk8s reduce    assemble a run's ordered result.jsonl
    dfk8s report    an HTML page of a run: counts, errors, and its images, prompts and captions

    \b
    dfk8s submit    run a pipeline on Kubernetes: shards on S3, an Indexed Job, a reducer Job
    dfk8s status    a run's Jobs, per-shard progress and result location
    dfk8s logs      worker or reducer pod logs
    dfk8s cancel    delete a run's Jobs and pods (its storage stays; resubmit resumes)
    dfk8s list      the runs in a namespace
    """
    setup_logging(log_level)


@cli.command()
@shared_run_options
@click.option("--output", "-o", default="./runs", show_default=True, metavar="DIR|S3URI",
              help="Where runs live: a local folder or s3://bucket/prefix.")
@click.option("--workers", "-w", type=click.IntRange(min=1), default=4, show_default=True,
              help="Worker processes at once.")
@click.option("--shard-retries", type=click.IntRange(min=0), default=2, show_default=True,
              help="Extra attempts for a shard whose worker crashes (like backoffLimitPerIndex).")
@click.option("--progress/--no-progress", default=True, help="Show the progress bar (only on a terminal).")
@report_option
@click.option("--dry-run", is_flag=True,
              help="Read and check every row as planning does, write and send nothing: print the plan and "
                   "the cost estimate (tokens, images, price in sync and batch mode).")
def run(output, workers, shard_retries, progress, write_report_after, dry_run, **flags):
    """Run a pipeline on this machine: plan shards, run workers, reduce to one ordered result.jsonl.

    Re-running with --run-id resumes: finished shards and rows are skipped, nothing is duplicated.

    \b
    Example:
      export DF_API_KEY=...
      dfk8s run --pipeline caption --input data.json --output ./runs \\
          --api-url http://host/v1 --model gpt-5-nano --workers 4 --max-concurrency 64
    """
    from dfk8s.executors.local import LocalExecutor
    from dfk8s.runs import prepare_run

    request = run_request_from_flags(output, flags)
    request.parallelism = workers
    if dry_run:
        _dry_run(request)
        return
    _check_credentials(request.serving, request.pipeline)
    from dfk8s.progress import progress_bar

    # Planning reads, checks and shards every row (~40k rows/s): a million rows deserve a counter.
    with progress_bar(None, enabled=progress) as bar:
        task = bar.add_task("planning", total=None, failed=0, rate="-")
        storage, spec, resumed = prepare_run(request, on_row=lambda n: bar.update(task, completed=n))
    _err(f"run {spec.run_id}: {'resumed' if resumed else 'planned'} {spec.rows} rows in {spec.shards} "
         f"shards at {storage.url()}")
    executor = LocalExecutor(workers=workers, shard_retries=shard_retries, endpoint_url=request.endpoint_url,
                             show_progress=progress)
    summary = executor.execute(storage, spec)
    _print_summary(summary)
    _print_budget_stop(storage, spec, summary)
    after_run(write_report_after, storage.url(), spec.run_id, output, request.endpoint_url)
    if not summary.complete:
        raise click.exceptions.Exit(1)


def _print_budget_stop(storage, spec, summary) -> None:
    from dfk8s.budget import read_cost_record
    from dfk8s.cost import usd

    max_cost = (read_cost_record(storage) or {}).get("max_cost")
    if max_cost is not None and summary.cost_usd is not None and summary.cost_usd >= max_cost \
            and not summary.complete:
        _err(f"stopped at --max-cost {usd(max_cost)} (spent {usd(summary.cost_usd)}); finished rows are "
             f"kept: resume with --run-id {spec.run_id} --max-cost HIGHER")


def _dry_run(request) -> None:
    from dfk8s.runs import dry_run

    found = dry_run(request)
    spec = found.spec
    click.echo(f"dry run: nothing was written or sent; run {spec.run_id}"
         + (" (planned already: its stored estimate)" if found.resumed else ""))
    bad = spec.rows - found.good_rows
    click.echo(f"  rows: {spec.rows:,}"
               + (f" ({bad:,} with problems: they fail without a request)" if bad else ""))
    click.echo(f"  shards: {spec.shards:,} of up to {spec.rows_per_shard:,} rows")
    for line in found.estimate.lines() if found.estimate is not None else ["  cost: not estimated"]:
        click.echo(line)


def _print_summary(summary) -> None:
    line = (f"{summary.rows} rows: {summary.ok} ok, {summary.failed} failed"
            + (f", {summary.not_processed} not processed (shards {summary.failed_shards})"
               if summary.not_processed or summary.failed_shards else "")
            + f" in {summary.wall_seconds:.1f}s")
    if getattr(summary, "cost_usd", None) is not None:
        usage = summary.usage or {}
        from dfk8s.cost import usd

        line += (f"; cost {usd(summary.cost_usd)} ({usage.get('input_tokens', 0):,} input / "
                 f"{usage.get('output_tokens', 0):,} output tokens"
                 + (f", {usage['images']:,} images" if usage.get("images") else "") + ")")
    _err(line)
    click.echo(summary.result)


def _check_credentials(serving: str | None, pipeline: str) -> None:
    """Fail before planning when an API serving has no key (the worker would exit 42 on every shard)."""
    from dfk8s.pipelines import get_pipeline
    from dfk8s.servings import serving_info
    from dfk8s.servings.api import api_key_from_env

    info = serving_info(serving or get_pipeline(pipeline).default_serving)
    if info.credentials:
        api_key_from_env(info.credentials)


@cli.command()
@click.option("--run", "run_uri", required=True, metavar="DIR|S3URI", help="The run's location.")
@click.option("--index", type=click.IntRange(min=0), default=None,
              help="Shard index (default: $JOB_COMPLETION_INDEX, set by Kubernetes Indexed Jobs).")
@click.option("--s3-endpoint", envvar="AWS_ENDPOINT_URL", help="S3-compatible endpoint URL.")
def worker(run_uri, index, s3_endpoint):
    """Process one shard of a planned run, resuming from its checkpoint parts.

    Exit codes: 0 shard finished (row errors included); 42 it cannot succeed (do not retry);
    anything else: retry.
    """
    from dfk8s.storage import open_storage
    from dfk8s.worker import process_shard, shard_index_from_env

    setup_logging(os.environ.get("DFK8S_LOG_LEVEL") or "INFO")
    stats = process_shard(open_storage(run_uri, endpoint_url=s3_endpoint), shard_index_from_env(index),
                          endpoint_url=s3_endpoint)
    _err(f"shard {stats.index}: {stats.ok} ok, {stats.failed} failed")


@cli.command()
@click.argument("run_uri", metavar="RUN")
@click.option("--s3-endpoint", envvar="AWS_ENDPOINT_URL", help="S3-compatible endpoint URL.")
@click.option("--wait-job", metavar="NAME",
              help="First wait for this Kubernetes Job (the run's map Job) to complete or fail; its failed "
                   "indexes are named as failed shards (what the reduce Job runs).")
@click.option("--namespace", "-n",
              help="Namespace of --wait-job (default: the pod's, or the kubeconfig context's).")
def reduce(run_uri, s3_endpoint, wait_job, namespace):
    """Assemble RUN (a run's folder or s3:// URI) into result.jsonl, errors.jsonl and summary.json.

    Shards that did not finish are named in the summary; their rows are marked as not processed.
    """
    from dfk8s.reducer import reduce_run
    from dfk8s.storage import open_storage

    failed_shards = None
    if wait_job:
        from dfk8s.kube.wait import format_indexes, wait_for_map_job

        ended = wait_for_map_job(wait_job, namespace)
        failed_shards = ended.failed_indexes
        _err(f"job {wait_job}: {ended.phase}" + (f" ({ended.reason})" if ended.reason else "")
             + (f"; failed shards {format_indexes(failed_shards)}" if failed_shards else ""))
    _print_summary(reduce_run(open_storage(run_uri, endpoint_url=s3_endpoint), failed_shards=failed_shards))


@cli.command()
@click.option("--pipeline", "-p", required=True, type=click.Choice(sorted(__import__(
    "dfk8s.pipelines", fromlist=["PIPELINES"]).PIPELINES)), help="Pipeline the rows are for.")
@click.option("--input", "-i", "input_", required=True, metavar="PATH|S3URI", help="Manifest to check.")
@click.option("--input-key", help="Conversation key.")
@click.option("--image-key", help="Input image key.")
@click.option("--id-key", help="Row key holding a unique id.")
@click.option("--image-root", type=click.Path(file_okay=False), help="Folder relative image paths start at.")
@click.option("--s3-endpoint", envvar="AWS_ENDPOINT_URL", help="S3-compatible endpoint URL.")
def validate(pipeline, input_, input_key, image_key, id_key, image_root, s3_endpoint):
    """Check a manifest without running anything: every problem with its line or element, and a count.

    Exits 1 when any row has a problem.
    """
    from dfk8s.plan import iter_problems

    counts: dict = {}
    problems = 0
    for problem in iter_problems(input_, pipeline, counts, input_key=input_key, image_key=image_key,
                                 id_key=id_key, image_root=image_root, endpoint_url=s3_endpoint):
        problems += 1
        click.echo(f"{input_}: {problem}")
    bad = counts["rows"] - counts["good"]
    _err(f"{counts['good']} of {counts['rows']} rows are good"
         + (f"; {bad} rows have {problems} problems" if bad else ""))
    if bad:
        raise click.exceptions.Exit(1)


def main() -> None:
    """Console entry point: library errors become one line (``DFK8S_DEBUG=1`` shows the traceback)."""
    try:
        code = cli.main(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        _err("aborted")
        sys.exit(130)
    except Dfk8sError as exc:
        if os.environ.get("DFK8S_DEBUG"):
            raise
        _err(f"error: {exc}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _err("interrupted")
        sys.exit(130)


from dfk8s.cli_kube import register  # noqa: E402 - the Kubernetes commands join the group

register(cli)
cli.add_command(report_command)
