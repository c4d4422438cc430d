"""The one interface of both executors: start a planned run, follow it, read its status, cancel it.

A run is planned the same way for both (:func:`dfk8s.plan.launch.prepare_run`: shards and run.json on its
storage); an executor then runs its shards and reduces. The local executor's run lives in this process,
so its ``start`` only records the run and ``follow`` runs it to the end; the Kubernetes executor's
``start`` creates the Jobs and the run goes on without this process, ``follow`` watches it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Generic, TypeVar

from dfk8s.errors import Dfk8sError

if TYPE_CHECKING:
    from dfk8s.run.status import RunStatus

__all__ = ["Cancelled", "Executor", "cancel_provider_batches"]

#: What ``start`` returns and ``follow`` takes.
Handle = TypeVar("Handle")
#: What ``follow`` returns when the run has ended.
Outcome = TypeVar("Outcome")


@dataclass
class Cancelled:
    """What cancelling a run stopped; its data stays, and resuming it runs what is left.

    Attributes:
        run_id: The run.
        run_uri: Where its data stays (None: a cluster run whose Jobs named none).
        jobs: Kubernetes Jobs deleted.
        pods: Their pods deleted.
        batches: Provider batches cancelled (``--api-mode batch``); what they completed is kept.
        batch_error: Why the provider batches could not be cancelled, or None.

    """

    run_id: str
    run_uri: str | None = None
    jobs: list[str] = field(default_factory=list)
    pods: list[str] = field(default_factory=list)
    batches: list[str] = field(default_factory=list)
    batch_error: str | None = None


class Executor(ABC, Generic[Handle, Outcome]):
    """Runs the shards of a planned run and reduces them, somewhere."""

    #: What :func:`dfk8s.plan.planner.plan` sizes the shards for (``prepare_run(executor=...)``).
    name: ClassVar[str]

    @abstractmethod
    def start(self, storage, spec) -> Handle:
        """Start the shards of a planned run that have no done marker; return what :meth:`follow` takes.

        Args:
            storage: The run's storage (:func:`dfk8s.plan.launch.prepare_run` planned it there).
            spec: Its :class:`dfk8s.run.spec.RunSpec`.

        """

    @abstractmethod
    def follow(self, handle: Handle) -> Outcome:
        """Show the run's progress until it has ended (reduced, failed or cancelled); return how it ended."""

    @abstractmethod
    def status(self, run_id: str) -> RunStatus:
        """Read run ``run_id``: its storage (:func:`dfk8s.run.status.storage_status`), and what runs it.

        Raises:
            Dfk8sError: The run cannot be found.

        """

    @abstractmethod
    def cancel(self, run_id: str) -> Cancelled:
        """Stop run ``run_id`` (its provider batches too); its data stays for a resume."""


def cancel_provider_batches(storage) -> tuple[list[str], str | None]:
    """Batch mode: cancel the run's provider batches still running (what they completed is kept).

    Returns:
        The batch ids cancelled (none for a sync run), and why the cancel failed (None when it did not).

    """
    import asyncio

    from dfk8s.run.spec import RunSpec
    from dfk8s.servings.batch_mode import cancel_batches

    try:
        spec = RunSpec.load(storage)
        if spec.option("api_mode") != "batch":
            return [], None
        return asyncio.run(cancel_batches(storage, spec)), None
    except Dfk8sError as exc:
        return [], str(exc)
