"""The Kubernetes executor as an :class:`~dfk8s.executors.base.Executor`.

Public names are re-exported by :mod:`dfk8s.executors.kubernetes`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from dfk8s.errors import Dfk8sError
from dfk8s.executors.base import Cancelled, Executor, cancel_provider_batches
from dfk8s.executors.kubernetes._run_status import cancel_run, follow_run, run_status
from dfk8s.executors.kubernetes._submit import Submission, check_cluster, start_jobs
from dfk8s.kube import ClusterOptions, check_credentials
from dfk8s.run.status import RunStatus


@dataclass
class KubernetesExecutor(Executor[Submission, RunStatus]):
    """Runs a planned run as an Indexed Job (a pod per shard) and a reduce Job; it goes on without us.

    Attributes:
        clients: :class:`dfk8s.kube.client.KubeClients`.
        options: The cluster flags (``namespace`` resolved).
        output: ``s3://bucket/prefix`` runs live under, for :meth:`status` of a run whose Jobs are gone
            (default: read from its map Job).
        endpoint_url: The S3 endpoint from this machine (the pods' too, unless ``--cluster-s3-endpoint``).
        poll_seconds: How often :meth:`follow` reads the Jobs and the progress.
        show_progress: :meth:`follow` draws a progress bar (only on a terminal).
        echo: Where :meth:`follow` writes the Jobs' state lines.

    """

    name: ClassVar[str] = "kubernetes"

    clients: Any
    options: ClusterOptions
    output: str | None = None
    endpoint_url: str | None = None
    poll_seconds: float = 2.0
    show_progress: bool = True
    echo: Callable[[str], None] = print

    @property
    def namespace(self) -> str:
        """Where the run's Jobs are."""
        return self.options.namespace

    def start(self, storage, spec) -> Submission:
        """Create the map and reduce Jobs of a run planned on S3 (a resumed run's Jobs skip done shards).

        Raises:
            SpecError: An API serving without ``--api-key-secret``, a missing ServiceAccount, bad flags.
            KubernetesError: The cluster refused (e.g. the run's Jobs are still there).

        """
        warnings = check_credentials(spec.serving, self.options) + check_cluster(self.clients, self.options)
        return start_jobs(self.clients, self.options, storage, spec, warnings=warnings,
                          endpoint_url=self.endpoint_url)

    def follow(self, handle: Submission) -> RunStatus:
        """Show progress and the Jobs' state until the run has ended; return its last status.

        Raises:
            StoppedWaiting: Ctrl-C (the Jobs keep running).

        """
        return follow_run(self.clients, handle, poll_seconds=self.poll_seconds,
                          show_progress=self.show_progress, echo=self.echo)

    def status(self, run_id: str) -> RunStatus:
        """The run's Jobs, then its storage (from ``output``, else where its map Job says)."""
        return run_status(self.clients, self.namespace, run_id, output=self.output,
                          endpoint_url=self.endpoint_url)

    def cancel(self, run_id: str) -> Cancelled:
        """Delete the run's Jobs and pods, then cancel its provider batches; its data stays."""
        from dfk8s.storage import open_storage

        jobs, pods, run_uri = cancel_run(self.clients, self.namespace, run_id)
        cancelled = Cancelled(run_id=run_id, run_uri=run_uri, jobs=jobs, pods=pods)
        if run_uri:
            try:
                storage = open_storage(run_uri, endpoint_url=self.endpoint_url)
            except Dfk8sError as exc:
                cancelled.batch_error = str(exc)
            else:
                cancelled.batches, cancelled.batch_error = cancel_provider_batches(storage)
        return cancelled
