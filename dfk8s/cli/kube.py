"""The Kubernetes commands of the CLI: ``submit``, ``status``, ``logs``, ``cancel``, ``list``.

Each command checks its flags, calls :mod:`dfk8s.executors.kubernetes` / :mod:`dfk8s.kube.client`, prints.
``dfk8s.cli`` adds them to its group.
"""

from __future__ import annotations

import json
import os
import sys

import click
from click.core import ParameterSource

from dfk8s.cli._common import err, plural, s3_endpoint_option
from dfk8s.cli.options import given_flags, run_request_from_flags, shared_run_options
from dfk8s.cli.report import after_run, report_option
from dfk8s.run.layout import RUN_SPEC_KEY
from dfk8s.run.progress import describe_facts
from dfk8s.run.spec import SERVING_OPTION_NAMES

__all__ = ["cancel", "list_", "logs", "status", "submit"]


def _connection_options(func):
    """``--namespace``, ``--context`` and ``--kubeconfig``, shared by every cluster command."""
    func = click.option(
        "--kubeconfig",
        type=click.Path(dir_okay=False),
        help="kubeconfig file (default: $KUBECONFIG, then ~/.kube/config; in a pod: its service account).",
    )(func)
    func = click.option("--context", help="kubeconfig context (default: the current one).")(func)
    func = click.option(
        "--namespace", "-n", help="Namespace (default: the context's, in a pod its own, else 'default')."
    )(func)
    return func


def _warn_loopback(request, cluster_s3_endpoint) -> None:
    """Warn (not fail) when pods are told a loopback address: a real cluster's pods cannot reach it."""
    from urllib.parse import urlparse

    def loopback(url: str) -> bool:
        host = (urlparse(url).hostname or "").lower()
        return host == "localhost" or host.startswith("127.") or host == "::1"

    if request.endpoint_url and not cluster_s3_endpoint and loopback(request.endpoint_url):
        click.echo(f"warning: --s3-endpoint {request.endpoint_url} is a loopback address: pods cannot "
                   "reach it (theirs is their own); hint: --cluster-s3-endpoint URL", err=True)
    api_url = request.options.get("api_url")
    if api_url and loopback(api_url):
        click.echo(f"warning: --api-url {api_url} is a loopback address: pods cannot reach it (theirs is "
                   "their own)", err=True)


def _connect(context, kubeconfig, namespace):
    from dfk8s.kube.client import connect

    clients = connect(context=context, kubeconfig=kubeconfig)
    return clients, namespace or clients.namespace


@click.command()
@shared_run_options
@click.option(
    "--output",
    "-o",
    required=True,
    metavar="S3URI",
    help="Where runs live: s3://bucket/prefix (the pods read and write it).",
)
@_connection_options
@click.option("--image", help="Worker image; default: the job profile's.")
@click.option(
    "--reducer-image", help="Reducer image; default: the CPU image (a FLUX run's reducer needs no GPU image)."
)
@click.option(
    "--cluster-s3-endpoint",
    metavar="URL",
    envvar="DFK8S_CLUSTER_S3_ENDPOINT",
    help="S3 endpoint the pods use, when it differs from --s3-endpoint (e.g. you submit through a "
    "port-forward and pods reach the in-cluster service); default: $DFK8S_CLUSTER_S3_ENDPOINT.",
)
@click.option(
    "--parallelism",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Worker pods at once (the map Job's parallelism; capped at the shard count).",
)
@click.option("--queue", metavar="NAME", help="Kueue LocalQueue; the map Job waits suspended to be admitted.")
@click.option(
    "--api-key-secret",
    metavar="NAME/KEY",
    help="Secret key holding the API key (needed by API servings); becomes $DF_API_KEY in the pods.",
)
@click.option(
    "--s3-secret",
    metavar="NAME",
    help="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for the pods (else: workload identity).",
)
@click.option(
    "--hf-token-secret", metavar="NAME/KEY", help="Secret key holding a Hugging Face token (gated models)."
)
@click.option(
    "--model-cache-pvc",
    metavar="NAME",
    help="diffusers: an existing PersistentVolumeClaim holding the model cache, filled once by `dfk8s model "
    "pull MODEL --pvc NAME`; workers mount it read-only and load offline (a missing model fails at once).",
)
@click.option(
    "--model-cache-subpath", metavar="PATH", help="Folder inside the --model-cache-pvc claim to mount."
)
@click.option(
    "--gpus", type=click.IntRange(min=0), help="GPUs per worker pod (default: the profile's; 0: CPU nodes)."
)
@click.option(
    "--node-selector",
    multiple=True,
    metavar="KEY=VALUE",
    help="Node label the worker pods need (repeatable; replaces the profile's).",
)
@click.option(
    "--toleration",
    "tolerations",
    multiple=True,
    metavar="KEY[=VALUE]:EFFECT",
    help="Taint the worker pods tolerate (repeatable; replaces the profile's).",
)
@click.option(
    "--service-account",
    metavar="NAME",
    help="ServiceAccount of the reduce Job (it watches the map Job: get/list/watch jobs).",
)
@click.option(
    "--backoff-limit-per-index",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Retries of one shard before it is marked failed.",
)
@click.option(
    "--max-failed-indexes",
    type=click.IntRange(min=0),
    help="Failed shards before the whole map Job stops (default: never; failed shards are named).",
)
@click.option("--wait", is_flag=True, help="Follow the run (progress and Jobs) until it is reduced.")
@click.option(
    "--progress/--no-progress", default=True, help="With --wait: the progress bar (only on a terminal)."
)
@click.option(
    "--poll-seconds",
    type=click.FloatRange(min=0.05),
    default=2.0,
    show_default=True,
    hidden=True,
    help="With --wait: seconds between polls.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Write and create nothing: print the Jobs as YAML (stdout) and the plan (stderr).",
)
@report_option
@click.pass_context
def submit(ctx, output, namespace, context, kubeconfig, wait, progress, poll_seconds, dry_run,
           write_report_after, **flags):
    """Run a pipeline on Kubernetes: an Indexed Job (one pod per shard) and a Job that reduces.

    The shards (and local images) are written to --output first; the pods read them from there. The
    run goes on (and is reduced) without this terminal; --run-id of an existing run resumes it.
    Credentials reach the pods only through Secrets.

    \b
    Example:
      kubectl create secret generic dfk8s-api-key --from-literal=DF_API_KEY=...
      dfk8s submit --pipeline caption --input data.json --output s3://bucket/runs \\
          --api-key-secret dfk8s-api-key/DF_API_KEY --s3-secret dfk8s-s3 --parallelism 8 --wait
    """
    from dfk8s.executors import kubernetes
    from dfk8s.kube import ClusterOptions
    from dfk8s.kube.client import default_namespace

    # The cluster flags (one per ClusterOptions field) leave ``flags`` here; the run's flags stay.
    options = ClusterOptions.from_flags(flags, namespace=namespace or default_namespace(context, kubeconfig))
    request = run_request_from_flags(output, flags)
    request.given = given_flags(ctx)  # a resume refuses a flag that differs from run.json, as `run` does
    _warn_loopback(request, options.cluster_s3_endpoint)
    explicit = {
        name
        for name in SERVING_OPTION_NAMES
        if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)
    }
    if dry_run:
        _dry_run(kubernetes.dry_run(request, options, explicit=explicit))
        return
    clients, _ = _connect(context, kubeconfig, options.namespace)
    try:
        submission = kubernetes.submit(request, options, clients, explicit=explicit)
        for warning in submission.warnings:
            err(f"warning: {warning}")
        spec = submission.spec
        err(
            f"run {spec.run_id}: {'resumed' if submission.resumed else 'planned'} {plural(spec.rows, 'row')} "
            f"in {plural(spec.shards, 'shard')} at {submission.run_uri}"
        )
        err(
            f"created jobs {', '.join(submission.jobs)} in namespace {submission.namespace} ({clients.where})"
        )
        click.echo(spec.run_id)
        ns = f" -n {submission.namespace}"
        err(
            f"next:\n  dfk8s status {spec.run_id}{ns}\n"
            f"  dfk8s logs {spec.run_id}{ns} [--index N | --reducer] [--follow]\n"
            f"  dfk8s cancel {spec.run_id}{ns}"
        )
        if not wait:
            return
        executor = kubernetes.KubernetesExecutor(
            clients, options, poll_seconds=poll_seconds, show_progress=progress, echo=err
        )
        status = executor.follow(submission)
    finally:
        clients.close()
    if status.summary:
        _print_summary_line(status.summary)
        click.echo(status.summary.get("result", ""))
        after_run(write_report_after, submission.run_uri, spec.run_id, output, request.endpoint_url)
    if status.state != "complete":
        err(f"run {status.run_id} did not complete: {status.state}")
        raise click.exceptions.Exit(1)


def _dry_run(plan) -> None:
    from dfk8s.kube.manifests import to_yaml

    cfg = plan.config
    pods = min(cfg.parallelism, plan.shards)
    for warning in plan.warnings:
        err(f"warning: {warning}")
    err(f"dry run: nothing was written or created; run {cfg.run_id} in namespace {cfg.namespace}")
    bad = plan.rows - plan.good_rows
    err(f"  rows: {plan.rows:,}" + (f" ({bad:,} with problems: they fail without a request)" if bad else ""))
    err(f"  shards: {plan.shards:,} of up to {plural(plan.rows_per_shard, 'row')} (map Job completions)")
    if plan.shard_size is not None:
        err(f"  shard size: ~{_duration(plan.shard_size.seconds_per_shard)} per shard; default rule: "
             f"{plan.shard_size.rule} (--rows-per-shard or --shards to choose)")
    err(
        f"  pods: {pods} at once (parallelism {cfg.parallelism}"
        + (", capped at the shard count" if pods < cfg.parallelism else "")
        + ")"
        + (f", {cfg.gpu_count} GPU each" if cfg.gpu_count else "")
    )
    estimate = plan.estimate
    if estimate is not None:
        rpm = plan.options.get("rpm")
        err(f"  requests: {estimate.requests:,} (one per good row; retries not counted)")
        err(
            f"  rate: {estimate.per_minute:,.0f}/min = min(--rpm {rpm or 'unset'}, "
            f"{pods} pods x {estimate.concurrency} in flight x 60 / ~{estimate.latency:g} s per request); "
            f"bound by {estimate.bound}"
        )
        err(
            f"  time: ~{_duration(estimate.minutes * 60)} (assumes ~{estimate.latency:g} s per request; "
            "pod start-up not counted)"
        )
    for line in plan.cost.lines() if plan.cost is not None else []:
        err(line)
    if not plan.planned:
        err(
            f"  note: the pods read the shards from {cfg.run_uri}: this YAML runs only after the run is "
            f"planned there (dfk8s submit without --dry-run plans and creates)"
        )
    click.echo(to_yaml(plan.objects), nl=False)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _print_summary_line(summary: dict) -> None:
    line = f"{summary.get('rows', 0)} rows: {summary.get('ok', 0)} ok, {summary.get('failed', 0)} failed"
    if summary.get("not_processed") or summary.get("failed_shards"):
        line += f", {summary.get('not_processed', 0)} not processed (shards {summary.get('failed_shards')})"
    if summary.get("cost_usd") is not None:
        from dfk8s.cost.pricing import usd

        line += f"; cost {usd(summary['cost_usd'])}"
    err(line)


#: Where `dfk8s run` keeps its runs unless --output says otherwise.
LOCAL_RUNS = "./runs"


def _storage_status(run_id: str, output: str, endpoint_url: str | None, *, ask_cluster: bool):
    """A run's status from its storage under ``output``; None to ask the cluster instead (``ask_cluster``).

    Raises:
        RunNotFound: No run ``run_id`` under ``output`` (and no cluster to ask).
    """
    from dfk8s.errors import RunNotFound
    from dfk8s.plan.launch import run_storage
    from dfk8s.run.status import storage_status

    storage = run_storage(output, run_id, endpoint_url)
    if storage.exists(RUN_SPEC_KEY):
        return storage_status(storage)
    if ask_cluster:
        return None
    raise RunNotFound(f"run {run_id} not found under {output}" + (
        "" if output != LOCAL_RUNS else " (--output DIR|S3URI for runs elsewhere; a cluster run needs a "
        "kubeconfig or --context)"))


def _print_status(state) -> None:
    """The status display of a :class:`~dfk8s.run.status.RunStatus`, local or on a cluster."""
    from dfk8s.executors.kubernetes.wait import format_indexes

    cluster = state.source == "cluster"
    if cluster:
        click.echo(
            f"run {state.run_id}"
            + (f" ({state.pipeline})" if state.pipeline else "")
            + f" in namespace {state.namespace}: {state.state}"
        )
        for label, job in (("map", state.map_job), ("reduce", state.reduce_job)):
            click.echo(
                f"  {label} job: " + (f"{job.name}: {job.describe()}" if job else "none (deleted or expired)")
            )
            if job and job.finished == "Failed" and job.message:
                click.echo(f"    {job.reason}: {job.message}")
        for problem in state.problems:
            click.echo(f"  problem: {problem}")
    else:
        click.echo(f"run {state.run_id} ({state.pipeline}, {state.serving}) at {state.run_uri}: "
                   f"{state.state}")
        launcher = state.launcher or {}
        if launcher.get("live"):
            click.echo(f"  running: launcher pid {launcher.get('pid')} on {launcher.get('host')} "
                       f"(`dfk8s {launcher.get('command', 'run')}`), heartbeat "
                       f"{launcher['heartbeat_age']:.0f}s ago"
                       + (f"; {describe_facts(launcher)}" if "done" in launcher else ""))
    if state.storage_error:
        click.echo(f"  storage: cannot read {state.run_uri}: {state.storage_error}")
    elif state.progress is not None:
        done = state.progress
        click.echo(
            f"  progress: {done.rows:,}/{state.rows or 0:,} rows ({done.ok:,} ok, {done.failed:,} failed); "
            f"{len(state.shards_done)}/{plural(state.shards or 0, 'shard')} done"
            + (f" ({format_indexes(state.shards_done)})" if state.shards_done else "")
        )
    if state.breaker:
        breaker = state.breaker
        click.echo(f"  stopped by the circuit breaker (shard {breaker.get('shard', '?')}): every request "
                   f"failed with {breaker.get('type', 'one error')}: {breaker.get('message', '')}"
                   + (f"; {breaker['hint']}" if breaker.get("hint") else "") + "; a resume tries again")
    for line in state.batches + state.spend:
        click.echo(line)
    if state.summary:
        summary = state.summary
        click.echo(
            f"  result: {summary.get('result')}: {summary.get('rows', 0):,} rows, "
            f"{summary.get('ok', 0):,} ok, {summary.get('failed', 0):,} failed, "
            f"{summary.get('not_processed', 0):,} not processed"
        )
        if summary.get("failed_shards"):
            click.echo(f"  failed shards: {format_indexes(summary['failed_shards'])}")
    elif not cluster and not (state.launcher or {}).get("live"):
        where = f" -o {state.run_uri.rsplit('/', 1)[0]}" if state.run_uri else ""
        click.echo(f"  stopped before its end: resume with `dfk8s run --run-id {state.run_id}{where}`")
    elif state.run_uri:
        click.echo(f"  run data: {state.run_uri} (no result yet)")


@click.command()
@click.argument("run_id", metavar="RUN")
@_connection_options
@click.option(
    "--output",
    "-o",
    metavar="S3URI|DIR",
    help="s3://bucket/prefix the run is under (default: read from its map Job); a local folder shows a "
    "`dfk8s run` run from its storage alone.",
)
@s3_endpoint_option
@click.option("--json", "as_json", is_flag=True, help="The same facts as one JSON object (keys: README).")
def status(run_id, namespace, context, kubeconfig, output, s3_endpoint, as_json):
    """Show a run: its Jobs (completed, failed, active indexes), progress from storage, and its result.

    A cluster run's storage is read at the S3 endpoint its Jobs name unless --s3-endpoint is given.
    """
    from dfk8s.cli.status_json import from_status
    from dfk8s.kube.client import cluster_configured

    cluster_flags = bool(namespace or context or kubeconfig)
    state = None
    if not cluster_flags and (output is None or "://" not in output or not cluster_configured()):
        # A `dfk8s run` run (./runs by default, or --output DIR|S3URI) is read from its storage alone:
        # no kubeconfig is needed, and none is asked for.
        state = _storage_status(run_id, output or LOCAL_RUNS, s3_endpoint,
                                ask_cluster=output is None and cluster_configured())
    if state is None:
        from dfk8s.executors.kubernetes import KubernetesExecutor
        from dfk8s.kube import ClusterOptions

        clients, namespace = _connect(context, kubeconfig, namespace)
        try:
            executor = KubernetesExecutor(
                clients, ClusterOptions(namespace=namespace), output=output, endpoint_url=s3_endpoint
            )
            state = executor.status(run_id)
        finally:
            clients.close()
    if as_json:
        click.echo(json.dumps(from_status(state), indent=2))
    else:
        _print_status(state)


@click.command()
@click.argument("run_id", metavar="RUN")
@_connection_options
@click.option("--index", type=click.IntRange(min=0), help="Only the pods of this shard index.")
@click.option("--reducer", is_flag=True, help="The reduce Job's pod instead of the workers.")
@click.option("--follow", "-f", is_flag=True, help="Stream the log until the pod ends (one pod).")
@click.option("--tail", type=click.IntRange(min=0), help="Only the last N lines of each pod.")
def logs(run_id, namespace, context, kubeconfig, index, reducer, follow, tail):
    """Print the logs of a run's pods: workers (all, or one --index), or the --reducer.

    With several pods (one per shard, and retries), each log starts with a ``==> POD <==`` line.
    """
    from dfk8s.kube.client import pod_index, pod_waiting_reason, read_pod_log, run_pods
    from dfk8s.kube.manifests import REDUCER_CONTAINER, WORKER_CONTAINER

    if reducer and index is not None:
        raise click.UsageError("--index and --reducer exclude each other")
    component = "reduce" if reducer else "map"
    container = REDUCER_CONTAINER if reducer else WORKER_CONTAINER
    clients, namespace = _connect(context, kubeconfig, namespace)
    try:
        pods = run_pods(clients, namespace, run_id, component=component, index=index)
        if not pods:
            what = (
                "the reducer" if reducer else ("index " + str(index) if index is not None else "the workers")
            )
            err(f"no pods of {what} of run {run_id} in namespace {namespace} (not started yet, or deleted)")
            raise click.exceptions.Exit(1)
        if follow:
            if len({pod_index(p) for p in pods}) > 1:
                raise click.UsageError("--follow streams one pod: add --index N or --reducer")
            pods = pods[-1:]  # the newest attempt
        for pod in pods:
            name = pod["metadata"]["name"]
            if len(pods) > 1:
                where = f"index {pod_index(pod)}, " if pod_index(pod) is not None else ""
                click.echo(f"==> {name} ({where}{pod.get('status', {}).get('phase', '?')}) <==")
            waiting = pod_waiting_reason(pod)
            if waiting and pod.get("status", {}).get("phase") == "Pending":
                click.echo(f"(pod {name} has not started: {waiting})")
                continue
            for line in read_pod_log(clients, namespace, name, container, follow=follow, tail=tail):
                click.echo(line)
                if follow:
                    sys.stdout.flush()
    finally:
        clients.close()


def _print_batches_cancelled(cancelled) -> None:
    if cancelled.batch_error:
        err(f"warning: could not cancel the run's provider batches: {cancelled.batch_error}")
    elif cancelled.batches:
        err(f"cancelled provider batches {', '.join(cancelled.batches)}; what they completed is kept: "
             "resuming maps it")


@click.command()
@click.argument("run_id", metavar="RUN")
@_connection_options
@click.option("--output", "-o", metavar="DIR",
              help="A `dfk8s run` run under this local folder: only cancel its provider batches "
                   "(batch mode).")
def cancel(run_id, namespace, context, kubeconfig, output):
    """Stop a run: delete its Jobs and their pods. Its data stays; submit --run-id RUN resumes it.

    In batch mode the provider batches are cancelled too; what they completed is kept.
    """
    if output and not output.startswith("s3://"):
        from dfk8s.executors.local.executor import LocalExecutor

        _print_batches_cancelled(LocalExecutor(output=output).cancel(run_id))
        return
    from dfk8s.executors.kubernetes import KubernetesExecutor
    from dfk8s.kube import ClusterOptions

    clients, namespace = _connect(context, kubeconfig, namespace)
    try:
        cancelled = KubernetesExecutor(clients, ClusterOptions(namespace=namespace)).cancel(run_id)
    finally:
        clients.close()
    jobs, run_uri = cancelled.jobs, cancelled.run_uri
    err(
        f"cancelled run {run_id}: deleted "
        + (f"jobs {', '.join(jobs)}" if jobs else "no jobs")
        + f" and {len(cancelled.pods)} pods in namespace {namespace}"
    )
    if run_uri:
        _print_batches_cancelled(cancelled)
        output = run_uri.rsplit("/", 1)[0]
        err(
            f"its data stays at {run_uri}; resume with: dfk8s submit --run-id {run_id} --output {output} "
            "and the cluster flags (--api-key-secret, --s3-secret, ...)"
        )


@click.command(name="list")
@_connection_options
@click.option("--output", "-o", metavar="DIR|S3URI",
              help="Also list the runs stored here (`dfk8s run`'s --output; default ./runs when it exists).")
@s3_endpoint_option
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
def list_(namespace, context, kubeconfig, output, s3_endpoint, as_json):
    """List runs, newest first, with their state: stored ones and, with a cluster, a namespace's.

    The runs stored under --output (default ./runs), read from their records, and where a cluster is
    configured, those in a namespace (from their Jobs).
    """
    import dataclasses

    from dfk8s.executors.kubernetes.wait import format_indexes
    from dfk8s.kube.client import cluster_configured
    from dfk8s.run.status import list_stored_runs
    from dfk8s.storage import open_storage

    where = output or (LOCAL_RUNS if os.path.isdir(LOCAL_RUNS) else None)
    stored = list_stored_runs(open_storage(where, endpoint_url=s3_endpoint)) if where else []
    runs, cluster_error = [], None
    if namespace or context or kubeconfig or cluster_configured():
        from dfk8s.errors import KubernetesError
        from dfk8s.executors.kubernetes import list_runs

        try:
            clients, namespace = _connect(context, kubeconfig, namespace)
            try:
                runs = list_runs(clients, namespace)
            finally:
                clients.close()
        except KubernetesError as exc:
            if namespace or context or kubeconfig or not where:
                raise  # the cluster was asked for: its error is the answer
            cluster_error = str(exc)
    if as_json:
        click.echo(json.dumps([{**dataclasses.asdict(run), "source": "storage"} for run in stored]
                              + [{**dataclasses.asdict(run), "source": "cluster", "namespace": namespace}
                                 for run in runs], indent=2))
        return
    if where:
        _table([("RUN", "PIPELINE", "STATE", "ROWS", "SHARDS", "CREATED")] + [
            (r.run_id, r.pipeline, r.state, f"{r.done}/{r.rows}", str(r.shards), r.created) for r in stored
        ], empty=f"no runs under {where}", title=f"runs under {where}:" if namespace else None)
    if namespace:
        _table([("RUN", "PIPELINE", "STATE", "SHARDS", "FAILED", "CREATED")] + [
            (r.run_id, r.pipeline, r.state, f"{r.completed}/{r.shards}", format_indexes(r.failed) or "-",
             r.created) for r in runs
        ], empty=f"no dfk8s runs in namespace {namespace}",
            title=f"runs in namespace {namespace}:" if where else None)
    elif cluster_error:
        err(f"cluster runs not listed: {cluster_error}")


def _table(rows: list[tuple], *, empty: str, title: str | None) -> None:
    if title:
        click.echo(title)
    if len(rows) == 1:
        err(empty)
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
