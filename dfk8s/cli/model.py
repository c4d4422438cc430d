"""``dfk8s model pull`` and ``dfk8s model list``: a model cache filled once, here or on a cluster's PVC.

Each command checks its flags, calls :mod:`dfk8s.models.hub` (this machine) or :mod:`dfk8s.kube.model_jobs` (a
Job on the cluster), prints. ``dfk8s.cli`` adds the group with one line.
"""

from __future__ import annotations

import logging

import click

from dfk8s.cli._common import err
from dfk8s.cli.kube import _connect, _connection_options
from dfk8s.errors import Dfk8sError, SpecError

__all__ = ["model"]



@click.group()
def model():
    """Fill a model cache once and see what it holds (diffusers models from the Hugging Face Hub).

    \b
    dfk8s model pull MODEL --to DIR     into a folder on this machine (then HF_HOME=DIR, or --model FOLDER)
    dfk8s model pull MODEL --pvc NAME   into a cluster's PersistentVolumeClaim, by a Job
    dfk8s model list --dir DIR | --pvc NAME
    """


def _where(to, pvc) -> None:
    if (to is None) == (pvc is None):
        raise click.UsageError("give exactly one of --to DIR (this machine) or --pvc NAME (the cluster)")


@model.command()
@click.argument("model_name", metavar="MODEL")
@click.option(
    "--to",
    "to",
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="Fill this folder on this machine (it becomes HF_HOME; files go to DIR/hub).",
)
@click.option("--pvc", metavar="NAME", help="Fill this PersistentVolumeClaim of the cluster, by a Job.")
@click.option("--subpath", metavar="PATH", help="With --pvc: the folder inside the claim (its subPath).")
@click.option("--revision", metavar="REV", help="Branch, tag or commit (default: main).")
@click.option(
    "--hf-token-secret",
    metavar="NAME/KEY",
    help="With --pvc: Secret key holding a Hugging Face token (gated models). Here: $HF_TOKEN.",
)
@click.option("--hf-endpoint", metavar="URL", help="With --pvc: a Hub mirror for the Job (HF_ENDPOINT).")
@click.option("--image", help="With --pvc: the Job's image (default: the dfk8s CPU image of this version).")
@click.option("--wait", is_flag=True, help="With --pvc: follow the Job until the model is in the claim.")
@click.option("--dry-run", is_flag=True, help="With --pvc: print the Job as YAML and create nothing.")
@click.option(
    "--progress-seconds",
    type=click.FloatRange(min=0.05),
    default=30.0,
    hidden=True,
    help="With --to: seconds between progress lines.",
)
@_connection_options
def pull(model_name, to, pvc, progress_seconds, wait, dry_run, **job):
    """Download MODEL once: only the files its diffusers pipeline loads, resuming what is already there.

    Safetensors weights of each component (not also .bin copies, variants or the top-level single-file
    checkpoints), configs and tokenizers. Gated models (black-forest-labs/...) need a token of an account
    that accepted the licence.

    \b
    Examples:
      dfk8s model pull black-forest-labs/FLUX.1-dev --to /data/hf   # then HF_HOME=/data/hf HF_HUB_OFFLINE=1
      dfk8s model pull black-forest-labs/FLUX.1-dev --pvc hf-cache --hf-token-secret hf/HF_TOKEN --wait
      dfk8s submit -p text2image ... --model-cache-pvc hf-cache
    """
    _where(to, pvc)
    if to is not None:
        for flag, value in (
            ("--subpath", job["subpath"]),
            ("--hf-token-secret", job["hf_token_secret"]),
            ("--hf-endpoint", job["hf_endpoint"]),
            ("--image", job["image"]),
        ):
            if value:
                raise click.UsageError(
                    f"{flag} is for --pvc (here the token is $HF_TOKEN, the mirror $HF_ENDPOINT)"
                )
        if wait or dry_run:
            raise click.UsageError("--wait and --dry-run are for --pvc")
        _pull_here(model_name, to, job["revision"], progress_seconds)
        return
    _pull_on_cluster(model_name, pvc, wait=wait, dry_run=dry_run, **job)


def _make_compile_cache() -> None:
    """Make FLUX's compile-cache folder where ``$DFK8S_COMPILE_CACHE`` points (the pull Job sets it).

    Made by the pull, as the pods' user, it is writable by the FLUX pods that publish compiled artifacts
    into it; a folder the kubelet made for their subPath mount would be root's.
    """
    import os

    from dfk8s.servings.flux_speed import CACHE_ENV

    if folder := os.environ.get(CACHE_ENV):
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:  # the models are there: a compile per pod is what this costs
            err(f"warning: cannot make the compile cache {folder}: {exc}")


def _pull_here(model_name: str, to: str, revision: str | None, progress_seconds: float) -> None:
    from dfk8s.models.hub import format_bytes, pull_model

    # The pull's own lines (what is fetched, progress in pods) are INFO; the CLI's default level is WARNING.
    logging.getLogger("dfk8s.models.hub").setLevel(logging.INFO)
    result = pull_model(model_name, to, revision=revision, progress_seconds=progress_seconds)
    _make_compile_cache()
    err(
        f"pulled {result.model}@{result.revision} (commit {result.commit[:12]}): {len(result.files)} files, "
        f"{format_bytes(result.bytes)} (fetched {format_bytes(result.fetched_bytes)} now) into {to}"
    )
    err(
        f"  load it offline: HF_HOME={to} HF_HUB_OFFLINE=1 dfk8s run ... --model {result.model}"
        + ("" if result.revision == "main" else f"  (revision {result.revision}: use the folder below)")
    )
    err(f"  or by folder:    --model {result.snapshot}")
    click.echo(result.snapshot)


def _pull_on_cluster(model_name, pvc, *, subpath, revision, hf_token_secret, hf_endpoint, image, wait,
                     dry_run, namespace, context, kubeconfig) -> None:
    from dfk8s.executors.kubernetes.model_jobs import create_model_job
    from dfk8s.kube import cpu_image, parse_secret_ref
    from dfk8s.kube.client import default_namespace
    from dfk8s.kube.manifests import to_yaml
    from dfk8s.kube.model_jobs import build_pull_job

    namespace = namespace or default_namespace(context, kubeconfig)
    job = build_pull_job(
        model_name,
        pvc=pvc,
        namespace=namespace,
        image=image or cpu_image(),
        subpath=subpath,
        revision=revision,
        hf_token_secret=parse_secret_ref(hf_token_secret, "--hf-token-secret"),
        hf_endpoint=hf_endpoint,
    )
    name = job["metadata"]["name"]
    if dry_run:
        err(
            f"dry run: nothing was created; job {name} in namespace {namespace} would pull {model_name} into "
            f"PersistentVolumeClaim {pvc}"
        )
        click.echo(to_yaml([job]), nl=False)
        return
    clients, _ = _connect(context, kubeconfig, namespace)
    try:
        state = create_model_job(clients, job, replace_finished=True)
        if state == "running":
            err(f"job {name} is already pulling {model_name} into {pvc} in namespace {namespace}")
        else:
            err(
                f"created job {name} in namespace {namespace} ({clients.where}): "
                f"pulling {model_name} into {pvc}"
            )
        click.echo(name)
        if not wait:
            err(f"follow it: kubectl logs -f job/{name} -n {namespace}, or this command with --wait")
            return
        _follow_pull(clients, namespace, name, model_name, pvc)
    finally:
        clients.close()


def _follow_pull(clients, namespace: str, name: str, model_name: str, pvc: str) -> None:
    from dfk8s.executors.kubernetes.model_jobs import model_job_log, wait_model_job
    from dfk8s.kube.model_jobs import PULL_CONTAINER

    seen = {"failed": 0}

    def on_change(state) -> None:
        if state.failed_pods > seen["failed"]:
            seen["failed"] = state.failed_pods
            err(f"job {name}: pod attempt {state.failed_pods} failed; the next one resumes the download")

    final = wait_model_job(clients, namespace, name, on_change=on_change)
    tail = model_job_log(clients, namespace, name, PULL_CONTAINER, tail=20)
    if final.finished == "Complete":
        for line in tail.splitlines()[-3:]:
            err(f"  {line}")
        err(f"{model_name} is in {pvc}: submit with --model-cache-pvc {pvc}")
        return
    last = next((line.strip() for line in reversed(tail.splitlines()) if line.strip()), "no log")
    message = f"job {name} failed ({final.reason or 'failed'}): {last}"
    if final.reason == "PodFailurePolicy":
        raise SpecError(message)
    raise Dfk8sError(message)


@model.command(name="list")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="A cache folder on this machine (what --to filled; HF_HOME).",
)
@click.option("--pvc", metavar="NAME", help="A PersistentVolumeClaim of the cluster (read by a short Job).")
@click.option("--subpath", metavar="PATH", help="With --pvc: the folder inside the claim.")
@click.option("--image", help="With --pvc: the Job's image (default: the dfk8s CPU image).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one line) instead of a table.")
@_connection_options
def list_models(directory, pvc, subpath, image, as_json, namespace, context, kubeconfig):
    """Show the models a cache holds: revision, commit, size, files, and whether the pull finished."""
    from dfk8s.models.hub import cached_models_to_json, list_cache

    _where(directory, pvc)
    if directory is not None:
        models = list_cache(directory)
    else:
        models = _list_on_cluster(pvc, subpath, image, namespace, context, kubeconfig)
    if as_json:
        click.echo(cached_models_to_json(models))
        return
    _print_table(models, directory or f"PersistentVolumeClaim {pvc}")


def _list_on_cluster(pvc, subpath, image, namespace, context, kubeconfig):
    from dfk8s.executors.kubernetes.model_jobs import (
        create_model_job,
        delete_model_job,
        model_job_log,
        wait_model_job,
    )
    from dfk8s.kube import cpu_image
    from dfk8s.kube.client import default_namespace
    from dfk8s.kube.model_jobs import LIST_CONTAINER, build_list_job
    from dfk8s.models.hub import cached_models_from_log

    namespace = namespace or default_namespace(context, kubeconfig)
    job = build_list_job(pvc=pvc, namespace=namespace, image=image or cpu_image(), subpath=subpath)
    name = job["metadata"]["name"]
    clients, _ = _connect(context, kubeconfig, namespace)
    try:
        create_model_job(clients, job, replace_finished=False)
        try:
            final = wait_model_job(clients, namespace, name)
            text = model_job_log(clients, namespace, name, LIST_CONTAINER)
            if final.finished != "Complete":
                last = text.strip().splitlines()[-1] if text.strip() else "no log"
                raise Dfk8sError(f"job {name} reading {pvc} failed ({final.reason or 'failed'}): {last}")
            return cached_models_from_log(text)
        finally:
            delete_model_job(clients, namespace, name)
    finally:
        clients.close()


def _print_table(models, where: str) -> None:
    from dfk8s.models.hub import format_bytes

    if not models:
        err(f"no models in {where}")
        return
    rows = [("MODEL", "REVISION", "COMMIT", "SIZE", "FILES", "STATE", "FOLDER")]
    for item in models:
        rows.append(
            (
                item.model,
                ",".join(item.refs) or "-",
                item.commit[:12],
                format_bytes(item.bytes),
                str(item.files),
                "complete" if item.complete else "incomplete (pull again to resume)",
                item.snapshot,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1]
        )
