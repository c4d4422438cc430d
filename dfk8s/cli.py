"""The ``dfk8s`` command line: each command checks its flags, calls the library, prints."""

from __future__ import annotations

import logging
import os
import sys
import time

import click

from dfk8s import __version__
from dfk8s.cli_report import after_run, report_option
from dfk8s.cli_report import report as report_command
from dfk8s.errors import Dfk8sError
from dfk8s.log import setup_logging
from dfk8s.options import given_flags, local_run_options, retry_serving_options, run_request_from_flags


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
    dfk8s retry     re-run only the failed rows of a run (optionally with changed serving options)
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
    dfk8s model     pull a model once (here or into a cluster's PVC) and list a model cache
    """
    setup_logging(log_level)


def _lifecycle_options(func):
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


def _launcher_env(storage_patience: float, grace: float) -> None:
    # Workers inherit these: the same patience and grace in every process of the run.
    os.environ["DFK8S_STORAGE_PATIENCE"] = f"{storage_patience:g}"
    os.environ["DFK8S_GRACE_SECONDS"] = f"{grace:g}"


@cli.command()
@local_run_options
@_lifecycle_options
@report_option
@click.option("--dry-run", is_flag=True,
              help="Read and check every row as planning does, write and send nothing: print the plan and "
                   "the cost estimate (tokens, images, price in sync and batch mode).")
@click.pass_context
def run(ctx, output, workers, shard_retries, storage_patience, grace, max_failed_fraction, progress,
        write_report_after, dry_run, **flags):
    """Run a pipeline on this machine: plan shards, run workers, reduce to one ordered result.jsonl.

    Re-running with --run-id resumes: finished shards and rows are skipped, nothing is duplicated, and
    no other flag is needed (run.json knows them; a flag that differs is refused: see `dfk8s retry`).
    Ctrl-C (or SIGTERM/SIGHUP) lets requests in flight finish, checkpoints and stops every worker.

    \b
    Exit codes: 0 done; 1 shards did not finish, or too many rows failed (--max-failed-fraction);
    42 the run cannot succeed as given; 130/143/129 interrupted (resume with --run-id).

    \b
    Example:
      export DF_API_KEY=...
      dfk8s run --pipeline caption --input data.json --output ./runs \\
          --api-url http://host/v1 --model gpt-5-nano --workers 4 --max-concurrency 64
    """
    started = time.monotonic()
    _launcher_env(storage_patience, grace)
    request = run_request_from_flags(output, flags)
    request.given = given_flags(ctx)
    request.parallelism = workers
    if dry_run:  # before anything is checked for writing: a dry run writes nothing
        _dry_run(request)
        return
    from dfk8s.early import serving_guess, start_early
    from dfk8s.spec import new_run_id

    request.run_id = request.run_id or new_run_id()
    # The workers start first: their start-up overlaps this process's imports, checks and plan.
    early = start_early(output, request.run_id, serving_guess(request.serving, request.pipeline), workers,
                        endpoint_url=request.endpoint_url)
    try:
        summary, storage, spec = _run_local_checked(request, flags, output, workers, shard_retries, progress,
                                                    started, early)
    finally:
        if early is not None:
            early.discard()  # the checks or the plan failed before the executor took them

    def after() -> None:
        _print_budget_stop(storage, spec, summary)
        after_run(write_report_after, storage.url(), spec.run_id, output, request.endpoint_url)

    _finish(summary, max_failed_fraction, after)


def _run_local_checked(request, flags, output, workers, shard_retries, progress, started, early):
    """``dfk8s run`` after its workers started: check the output and the resume, then plan and run."""
    from dfk8s.runs import check_resume, existing_spec, run_local, run_storage
    from dfk8s.storage import check_output

    check_output(output, endpoint_url=request.endpoint_url)
    storage = run_storage(output, request.run_id, request.endpoint_url)
    frozen = existing_spec(storage)
    if frozen is not None:
        check_resume(frozen, request)
        _check_credentials(frozen.serving, frozen.pipeline)
    elif not request.pipeline:
        missing = click.ClickException("--pipeline is required to start a new run" + (
            f" (there is no run {flags['run_id']} under {output})" if flags.get("run_id") else ""))
        missing.exit_code = 2
        raise missing
    else:
        _check_credentials(request.serving, request.pipeline)
        _local_model_warnings(request)
    planned: dict = {}

    def on_planned(storage, spec, resumed) -> None:
        planned.update(storage=storage, spec=spec)
        _err(f"run {spec.run_id}: {'resumed' if resumed else 'planned'} {spec.rows} rows in "
             f"{spec.shards} shards at {storage.url()}")

    summary = run_local(request, workers=workers, shard_retries=shard_retries, show_progress=progress,
                        started=started, on_planned=on_planned, early=early)
    return summary, planned["storage"], planned["spec"]


def _finish(summary, max_failed_fraction: float, report=None) -> None:
    """Print the summary, then call ``report``; exit non-zero when shards failed or too many rows did."""
    _print_summary(summary)
    if report is not None:
        report()
    if not summary.complete:
        raise click.exceptions.Exit(1)
    failed_fraction = summary.failed / summary.rows if summary.rows else 0.0
    if summary.rows and (summary.failed == summary.rows or failed_fraction > max_failed_fraction):
        what = (f"every row failed ({summary.failed})" if summary.failed == summary.rows else
                f"{summary.failed} of {summary.rows} rows failed, more than --max-failed-fraction "
                f"{max_failed_fraction:g}")
        _err(f"error: {what}; see {summary.errors}")
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
    by_type = sorted(getattr(summary, "errors_by_type", {}).items(), key=lambda kv: -kv[1]["count"])
    for kind, entry in by_type[:8]:
        _err(f"  {kind}: {entry['count']} rows, e.g. {entry['example'][:200]}")
    if len(by_type) > 8:
        _err(f"  ... and {len(by_type) - 8} more error types (summary.json)")
    click.echo(summary.result)


@cli.command()
@click.argument("run_id", metavar="RUN")
@retry_serving_options
@_lifecycle_options
@click.option("--errors", "error_types", metavar="TYPE,...",
              help="Error types to retry (default: the retryable ones: rate limits, server errors, timeouts, "
                   "connection errors, not processed, and image fetches that timed out or got 429/5xx).")
@click.option("--all-errors", is_flag=True, help="Retry every failed row, whatever its error.")
@click.option("--no-run", is_flag=True,
              help="Only reopen the rows (for a Kubernetes run: then `dfk8s submit --run-id RUN` runs them).")
@click.pass_context
def retry(ctx, run_id, output, workers, shard_retries, storage_patience, grace, max_failed_fraction, progress,
          error_types, all_errors, no_run, **flags):
    """Re-run only the failed rows of RUN (by default those that failed for a reason that can pass).

    Rows that succeeded are never sent again. Serving options may change for the retry (--model,
    --max-retries, --api-url, ...); the change is recorded in run.json's history. The run is reduced
    again: result.jsonl holds every row once, in input order.

    \b
    Example:
      dfk8s retry 20261201-101500-3f9a2c -o ./runs --max-retries 10
      dfk8s retry 20261201-101500-3f9a2c -o ./runs --errors BadRequest --model gpt-5-mini
    """
    from dfk8s.executors.local import Interrupted, LocalExecutor
    from dfk8s.lease import RunLease
    from dfk8s.options import SERVING_OPTION_NAMES
    from dfk8s.retry import plan_retry
    from dfk8s.runs import existing_spec, record_session, run_storage
    from dfk8s.storage import check_output

    started = time.monotonic()
    _launcher_env(storage_patience, grace)
    given = given_flags(ctx)
    endpoint = flags.get("s3_endpoint")
    check_output(output, endpoint_url=endpoint)
    storage = run_storage(output, run_id, endpoint)
    spec = existing_spec(storage)
    if spec is None:
        from dfk8s.errors import RunNotFound

        raise RunNotFound(f"no run {run_id} under {output}")
    changes = {name: flags[name] for name in SERVING_OPTION_NAMES if name in given and name in flags}
    types = {t.strip() for t in error_types.split(",") if t.strip()} if error_types else None
    with RunLease(storage, command="retry"):
        if not no_run:  # --no-run sends nothing: a Kubernetes run's key lives in a Secret, not here
            _check_credentials(flags.get("serving") or spec.serving, spec.pipeline)
        spec, reopened = plan_retry(storage, types=types, all_errors=all_errors, options=changes,
                                    serving=flags.get("serving") if "serving" in given else None)
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(reopened.by_type.items())) or "none"
        _err(f"run {run_id}: retrying {reopened.rows} rows in {len(reopened.shards)} shards ({kinds})"
             + (f"; changed {', '.join(f'{k} {v[0]} -> {v[1]}' for k, v in reopened.changes.items())}"
                if reopened.changes else ""))
        if no_run:
            here = f"dfk8s run --run-id {run_id} -o {output}"
            if output.startswith("s3://"):
                _err(f"reopened; run them on Kubernetes with: dfk8s cancel {run_id} (if its Jobs are still "
                     f"there), then dfk8s submit --run-id {run_id} --output {output} and the cluster flags "
                     f"of the first submit (--api-key-secret, --s3-secret, ...); or here: {here}")
            else:
                _err(f"reopened; run them with: {here}")
            return
        executor = LocalExecutor(workers=workers, shard_retries=shard_retries, endpoint_url=endpoint,
                                 show_progress=progress, output=output, started=started)
        outcome = "finished"
        try:
            summary = executor.follow(executor.start(storage, spec, only=set(reopened.shards)))
        except Interrupted:
            outcome = "interrupted"
            raise
        finally:
            record_session(storage, {"action": "retry-run", "outcome": outcome, "workers": workers,
                                     "seconds": round(time.monotonic() - started, 3)})
    _finish(summary, max_failed_fraction)


def _local_model_warnings(request) -> None:
    """Warn before planning when diffusers workers cannot get their model (offline and not cached, ...)."""
    from dfk8s.pipelines import get_pipeline

    serving = request.serving or get_pipeline(request.pipeline).default_serving
    if serving != "diffusers" or not request.input:  # a resumed run keeps the model of its run.json
        return
    from dfk8s.models import local_run_warnings
    from dfk8s.servings.diffusers_flux import MODELS

    for warning in local_run_warnings(request.options.get("model") or MODELS[request.pipeline][1]):
        _err(f"warning: {warning}")


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
@click.option("--serve", is_flag=True,
              help="Long-lived: read shard indexes from stdin, one a line, and answer each with a JSON line "
                   "on stdout (what `dfk8s run` starts; the serving is built once for all of them).")
@click.option("--s3-endpoint", envvar="AWS_ENDPOINT_URL", help="S3-compatible endpoint URL.")
def worker(run_uri, index, serve, s3_endpoint):
    """Process one shard of a planned run, resuming from its checkpoint parts.

    On SIGTERM it stops taking rows, lets requests in flight finish ($DFK8S_GRACE_SECONDS, default 20),
    checkpoints every finished row and exits 143 (a retry resumes where it stopped).

    Exit codes: 0 shard finished (row errors included); 42 it cannot succeed (do not retry);
    anything else: retry.
    """
    from dfk8s.lifecycle import StopToken, install_stop_signals, watch_parent
    from dfk8s.storage import open_storage
    from dfk8s.worker import WorkerSession, process_shard, quiet_gc, shard_index_from_env
    from dfk8s.worker import serve as serve_shards

    setup_logging(os.environ.get("DFK8S_LOG_LEVEL") or "INFO")
    stop = StopToken()
    install_stop_signals(stop)
    watch_parent(stop)  # only when a local launcher set DFK8S_PARENT_PID
    storage = open_storage(run_uri, endpoint_url=s3_endpoint)
    if serve and (preload := os.environ.get("DFK8S_PRELOAD_SERVING")):
        _preload(preload)
    quiet_gc()
    if serve:
        replies = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)  # stray prints of libraries go to the log, never into the replies
        code = serve_shards(storage, endpoint_url=s3_endpoint, replies=replies, stop=stop)
        replies.flush()
        logging.shutdown()
        os._exit(code)  # a stopped worker does not wait for a model call still running in a thread
    from dfk8s.errors import WorkerStopped

    session = WorkerSession(stop=stop)
    try:
        stats = process_shard(storage, shard_index_from_env(index), endpoint_url=s3_endpoint, session=session)
    except WorkerStopped as exc:
        _err(f"error: {exc}")
        logging.shutdown()
        os._exit(exc.exit_code)  # a model call may still run in a thread: do not wait for it
    except BaseException:
        session.close()
        raise
    session.close()  # the HTTP session closes on its own event loop
    _err(f"shard {stats.index}: {stats.ok} ok, {stats.failed} failed")


def _preload(serving: str) -> None:
    """Import a serving's modules before the first shard arrives (a worker started before the plan)."""
    from dfk8s.servings import serving_class

    try:
        serving_class(serving)
    except Exception as exc:  # the first shard reports it properly
        logging.getLogger(__name__).debug("could not preload serving %s: %s", serving, exc)


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
        from dfk8s.executors.kubernetes.wait import format_indexes, wait_for_map_job

        ended = wait_for_map_job(wait_job, namespace)
        failed_shards = ended.failed_indexes
        _err(f"job {wait_job}: {ended.phase}" + (f" ({ended.reason})" if ended.reason else "")
             + (f"; failed shards {format_indexes(failed_shards)}" if failed_shards else ""))
    _print_summary(reduce_run(open_storage(run_uri, endpoint_url=s3_endpoint), failed_shards=failed_shards))


@cli.command()
@click.option("--pipeline", "-p", required=True, type=click.Choice(sorted(__import__(
    "dfk8s.pipelines", fromlist=["PIPELINES"]).PIPELINES)), help="Pipeline the rows are for.")
@click.option("--input", "-i", "input_", required=True, metavar="PATH|S3URI",
              help="Manifest to check (file, folder or glob; JSON, JSONL or Parquet; or a folder of images).")
@click.option("--input-key", help="Conversation key.")
@click.option("--image-key", help="Input image key.")
@click.option("--id-key", help="Row key holding a unique id.")
@click.option("--image-root", type=click.Path(file_okay=False), help="Folder relative image paths start at.")
@click.option("--prompt", metavar="TEXT", help="The user turn for rows without a conversation.")
@click.option("--limit", type=click.IntRange(min=1), help="Check only the first N rows.")
@click.option("--allow-private-image-hosts", is_flag=True, help="Do not refuse private image addresses.")
@click.option("--s3-endpoint", envvar="AWS_ENDPOINT_URL", help="S3-compatible endpoint URL.")
def validate(pipeline, input_, input_key, image_key, id_key, image_root, prompt, limit,
             allow_private_image_hosts, s3_endpoint):
    """Check a manifest without running anything: every problem with its line, element or row, and a count.

    http(s) images are checked for syntax and scheme only (not fetched). Exits 1 when any row has a problem.
    """
    from dfk8s.plan import iter_problems

    counts: dict = {}
    problems = 0
    options = {"prompt": prompt, "allow_private_image_hosts": allow_private_image_hosts}
    for problem in iter_problems(input_, pipeline, counts, input_key=input_key, image_key=image_key,
                                 id_key=id_key, image_root=image_root, endpoint_url=s3_endpoint,
                                 options=options, limit=limit):
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
cli.add_command(__import__("dfk8s.cli_model", fromlist=["model"]).model)  # dfk8s model pull / list
