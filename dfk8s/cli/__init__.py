"""The ``dfk8s`` command line: each command checks its flags, calls the library, prints."""

from __future__ import annotations

import os
import sys

import click

from dfk8s import __version__
from dfk8s.cli._common import err
from dfk8s.cli.log import setup_logging
from dfk8s.errors import Dfk8sError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="dfk8s")
@click.option("--log-level", envvar="DFK8S_LOG_LEVEL", default=None,
              help="Log level (default WARNING; workers INFO). DFK8S_DEBUG=1 shows tracebacks.")
def cli(log_level):
    """Run multimodal data pipelines (caption, VQA, text-to-image, image editing) over manifests.

    A manifest is a JSON array, JSONL or Parquet file (local or s3://), a folder or glob of them, a
    folder of images (one row each), or a finished run (the next stage of a chain).

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
        err("aborted")
        sys.exit(130)
    except Dfk8sError as exc:
        if os.environ.get("DFK8S_DEBUG"):
            raise
        err(f"error: {exc}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err("interrupted")
        sys.exit(130)



def _register() -> None:
    """Every command joins the group: the local ones, the Kubernetes ones, report and model."""
    from dfk8s.cli import kube, model, report, run

    for command in (run.run, run.retry, run.worker, run.reduce, run.validate, kube.submit, kube.status,
                    kube.logs, kube.cancel, kube.list_, report.report, model.model):
        cli.add_command(command)


_register()
