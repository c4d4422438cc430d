"""Executors run a planned run's shards and reduce them: ``local`` processes, or ``kubernetes`` Jobs.

Both implement :class:`~dfk8s.executors.base.Executor` (start, follow, status, cancel) and read a run's
status with one builder (:func:`dfk8s.run.status.storage_status`).
"""

from dfk8s.executors.base import Cancelled, Executor

__all__ = ["Cancelled", "Executor"]
