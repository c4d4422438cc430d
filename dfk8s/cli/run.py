"""The local commands: ``run``, ``retry``, ``worker``, ``reduce`` and ``validate``."""

from __future__ import annotations

import logging
import os
import time

import click

from dfk8s.cli._common import (
    err,
    finish,
    launcher_env,
    lifecycle_options,
    plural,
    print_summary,
    s3_endpoint_option,
)
from dfk8s.cli.log import setup_logging
from dfk8s.cli.options import given_flags, local_run_options, retry_serving_options, run_request_from_flags
from dfk8s.cli.report import after_run, report_option


@click.command()
@local_run_options
@lifecycle_options
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
    launcher_env(storage_patience, grace)
    request = run_request_from_flags(output, flags)
    request.given = given_flags(ctx)
    request.parallelism = workers
    if dry_run:  # before anything is checked for writing: a dry run writes nothing
        _dry_run(request)
        return
    from dfk8s.executors.local.early import start_early
    from dfk8s.pipelines import serving_for
    from dfk8s.run.spec import new_run_id

    request.run_id = request.run_id or new_run_id()
    # The workers start first: their start-up overlaps this process's imports, checks and plan.
    early = start_early(output, request.run_id, serving_for(request.pipeline, request.serving), workers,
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

    finish(summary, max_failed_fraction, after, output=output)


def _run_local_checked(request, flags, output, workers, shard_retries, progress, started, early):
    """``dfk8s run`` after its workers started: check the output and the resume, then plan and run."""
    from dfk8s.executors.local.launch import run_local, serving_of
    from dfk8s.plan.launch import check_resume, existing_spec, run_storage
    from dfk8s.servings import require_credentials, require_installed
    from dfk8s.storage import check_output

    check_output(output, endpoint_url=request.endpoint_url)
    storage = run_storage(output, request.run_id, request.endpoint_url)
    frozen = existing_spec(storage)
    if frozen is not None:
        check_resume(frozen, request)
        require_installed(frozen.serving, frozen.options)
        require_credentials(frozen.serving)
    elif not request.pipeline:
        missing = click.ClickException("--pipeline is required to start a new run" + (
            f" (there is no run {flags['run_id']} under {output})" if flags.get("run_id") else ""))
        missing.exit_code = 2
        raise missing
    else:
        require_installed(serving_of(request), request.options)
        require_credentials(serving_of(request))
        _local_model_warnings(request)
    planned: dict = {}

    def on_planned(storage, spec, resumed) -> None:
        planned.update(storage=storage, spec=spec)
        err(f"run {spec.run_id}: {'resumed' if resumed else 'planned'} {plural(spec.rows, 'row')} in "
            f"{plural(spec.shards, 'shard')} at {storage.url()}")

    summary = run_local(request, workers=workers, shard_retries=shard_retries, show_progress=progress,
                        started=started, on_planned=on_planned, early=early)
    return summary, planned["storage"], planned["spec"]


def _print_budget_stop(storage, spec, summary) -> None:
    from dfk8s.cost.pricing import usd

    budget = summary.budget or {}
    if budget.get("stopped_shards") and not summary.complete:
        spent = usd(summary.cost_usd or 0.0)
        err(f"stopped at --max-cost {usd(budget['max_cost'])} (spent {spent}): the next requests did not fit "
            f"what was left; finished rows are kept: resume with --run-id {spec.run_id} --max-cost HIGHER")


def _dry_run(request) -> None:
    from dfk8s.plan.launch import dry_run

    found = dry_run(request)
    spec = found.spec
    click.echo(f"dry run: nothing was written or sent; run {spec.run_id}"
         + (" (planned already: its stored estimate)" if found.resumed else ""))
    bad = spec.rows - found.good_rows
    click.echo(f"  rows: {spec.rows:,}"
               + (f" ({bad:,} with problems: they fail without a request)" if bad else ""))
    click.echo(f"  shards: {spec.shards:,} of up to {plural(spec.rows_per_shard, 'row')}")
    for line in found.estimate.lines() if found.estimate is not None else ["  cost: not estimated"]:
        click.echo(line)


@click.command()
@click.argument("run_id", metavar="RUN")
@retry_serving_options
@lifecycle_options
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
    from dfk8s.executors.local.launch import retry_local
    from dfk8s.run.spec import SERVING_OPTION_NAMES

    started = time.monotonic()
    launcher_env(storage_patience, grace)
    given = given_flags(ctx)
    changes = {name: flags[name] for name in SERVING_OPTION_NAMES if name in given and name in flags}
    types = {t.strip() for t in error_types.split(",") if t.strip()} if error_types else None

    def say_reopened(reopened) -> None:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(reopened.by_type.items())) or "none"
        shards = plural(len(reopened.shards), "shard")
        err(f"run {run_id}: retrying {plural(reopened.rows, 'row')} in {shards} ({kinds})"
            + (f"; changed {', '.join(f'{k} {v[0]} -> {v[1]}' for k, v in reopened.changes.items())}"
               if reopened.changes else ""))

    _, summary = retry_local(output, run_id, types=types, all_errors=all_errors, changes=changes,
                             serving=flags.get("serving") if "serving" in given else None,
                             endpoint_url=flags.get("s3_endpoint"), workers=workers,
                             shard_retries=shard_retries, show_progress=progress, started=started,
                             reopen_only=no_run, on_reopened=say_reopened)
    if summary is None:  # --no-run
        here = f"dfk8s run --run-id {run_id} -o {output}"
        if output.startswith("s3://"):
            err(f"reopened; run them on Kubernetes with: dfk8s cancel {run_id} (if its Jobs are still "
                f"there), then dfk8s submit --run-id {run_id} --output {output} and the cluster flags "
                f"of the first submit (--api-key-secret, --s3-secret, ...); or here: {here}")
        else:
            err(f"reopened; run them with: {here}")
        return
    finish(summary, max_failed_fraction, output=output)


def _local_model_warnings(request) -> None:
    """Warn before planning when GPU workers cannot get their model (offline and not cached, ...)."""
    from dfk8s.pipelines import serving_for
    from dfk8s.servings import serving_info

    info = serving_info(serving_for(request.pipeline, request.serving))
    if not info.gpu or not request.input:  # a resumed run keeps the model of its run.json
        return
    from dfk8s.models.hub import local_run_warnings

    model = request.options.get("model") or info.defaults_for(request.pipeline).get("model")
    for warning in local_run_warnings(model) if model else ():
        err(f"warning: {warning}")


@click.command()
@click.option("--run", "run_uri", required=True, metavar="DIR|S3URI", help="The run's location.")
@click.option("--index", type=click.IntRange(min=0), default=None,
              help="Shard index (default: $JOB_COMPLETION_INDEX, set by Kubernetes Indexed Jobs).")
@click.option("--serve", is_flag=True,
              help="Long-lived: read shard indexes from stdin, one a line, and answer each with a JSON line "
                   "on stdout (what `dfk8s run` starts; the serving is built once for all of them).")
@s3_endpoint_option
def worker(run_uri, index, serve, s3_endpoint):
    """Process one shard of a planned run, resuming from its checkpoint parts.

    On SIGTERM it stops taking rows, lets requests in flight finish ($DFK8S_GRACE_SECONDS, default 20),
    checkpoints every finished row and exits 143 (a retry resumes where it stopped).

    Exit codes: 0 shard finished (row errors included); 42 it cannot succeed (do not retry);
    anything else: retry.
    """
    from dfk8s.storage import open_storage
    from dfk8s.worker.lifecycle import StopToken, install_stop_signals, watch_parent
    from dfk8s.worker.session import WorkerSession, quiet_gc
    from dfk8s.worker.shard import process_shard, shard_index_from_env

    setup_logging(os.environ.get("DFK8S_LOG_LEVEL") or "INFO")
    stop = StopToken()
    install_stop_signals(stop)
    watch_parent(stop)  # only when a local launcher set DFK8S_PARENT_PID
    storage = open_storage(run_uri, endpoint_url=s3_endpoint)
    if serve and (preload := os.environ.get("DFK8S_PRELOAD_SERVING")):
        _preload(preload)
    quiet_gc()
    if serve:
        from dfk8s.executors.local.pipe import serve_on_stdio

        code = serve_on_stdio(storage, endpoint_url=s3_endpoint, stop=stop)
        logging.shutdown()
        os._exit(code)  # a stopped worker does not wait for a model call still running in a thread
    from dfk8s.errors import WorkerStopped

    session = WorkerSession(stop=stop)
    try:
        stats = process_shard(storage, shard_index_from_env(index), endpoint_url=s3_endpoint, session=session)
    except WorkerStopped as exc:
        err(f"error: {exc}")
        logging.shutdown()
        os._exit(exc.exit_code)  # a model call may still run in a thread: do not wait for it
    except BaseException:
        session.close()
        raise
    session.close()  # the HTTP session closes on its own event loop
    err(f"shard {stats.index}: {stats.ok} ok, {stats.failed} failed")


def _preload(serving: str) -> None:
    """Import a serving's modules before the first shard arrives (a worker started before the plan)."""
    from dfk8s.servings import serving_class

    try:
        serving_class(serving)
    except Exception as exc:  # the first shard reports it properly
        logging.getLogger(__name__).debug("could not preload serving %s: %s", serving, exc)


@click.command()
@click.argument("run_uri", metavar="RUN")
@s3_endpoint_option
@click.option("--wait-job", metavar="NAME",
              help="First wait for this Kubernetes Job (the run's map Job) to complete or fail; its failed "
                   "indexes are named as failed shards (what the reduce Job runs).")
@click.option("--namespace", "-n",
              help="Namespace of --wait-job (default: the pod's, or the kubeconfig context's).")
def reduce(run_uri, s3_endpoint, wait_job, namespace):
    """Assemble RUN (a run's folder or s3:// URI) into result.jsonl, errors.jsonl and summary.json.

    Shards that did not finish are named in the summary; their rows are marked as not processed.
    """
    from dfk8s.reduce.reducer import reduce_run
    from dfk8s.storage import open_storage

    failed_shards = None
    if wait_job:
        from dfk8s.executors.kubernetes.wait import format_indexes, wait_for_map_job

        ended = wait_for_map_job(wait_job, namespace)
        failed_shards = ended.failed_indexes
        err(f"job {wait_job}: {ended.phase}" + (f" ({ended.reason})" if ended.reason else "")
             + (f"; failed shards {format_indexes(failed_shards)}" if failed_shards else ""))
    print_summary(reduce_run(open_storage(run_uri, endpoint_url=s3_endpoint), failed_shards=failed_shards))


@click.command()
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
@s3_endpoint_option
def validate(pipeline, input_, input_key, image_key, id_key, image_root, prompt, limit,
             allow_private_image_hosts, s3_endpoint):
    """Check a manifest without running anything: every problem with its line, element or row, and a count.

    http(s) images are checked for syntax and scheme only (not fetched). Exits 1 when any row has a problem.
    """
    from dfk8s.plan.checks import ProblemGroups
    from dfk8s.plan.planner import iter_problems

    counts: dict = {}
    groups = ProblemGroups()  # identical problems of many rows are one line: "150 rows: ... (lines 1-150)"
    options = {"prompt": prompt, "allow_private_image_hosts": allow_private_image_hosts}
    for problem in iter_problems(input_, pipeline, counts, input_key=input_key, image_key=image_key,
                                 id_key=id_key, image_root=image_root, endpoint_url=s3_endpoint,
                                 options=options, limit=limit):
        groups.add(problem)
    for line in groups.lines():
        click.echo(f"{input_}: {line}")
    bad = counts["rows"] - counts["good"]
    err(f"{counts['good']} of {counts['rows']} rows are good"
        + (f"; {bad} rows have {len(groups)} problems" if bad else ""))
    if bad:
        raise click.exceptions.Exit(1)


