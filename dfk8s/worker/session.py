"""What a worker process keeps from shard to shard: one event loop, one serving, one stop token."""

from __future__ import annotations

import asyncio
import logging
import os
import time

from dfk8s.run.spec import RunSpec
from dfk8s.servings import Serving, build_serving
from dfk8s.worker.lifecycle import StopToken

log = logging.getLogger(__name__)

__all__ = ["WorkerSession", "quiet_gc"]


class WorkerSession:
    """What a worker process keeps from shard to shard: one event loop, one serving, one stop token.

    A long-lived local worker processes many shards in one session, so imports, the HTTP session and a
    FLUX load happen once; a pod (or a plain ``process_shard`` call) uses a session for one shard.
    """

    def __init__(self, serving: Serving | None = None, *, stop: StopToken | None = None):
        self._serving = serving
        self.owns_serving = serving is None
        self.stop = stop or StopToken()
        self._runner: asyncio.Runner | None = None
        self._slots: dict[int, asyncio.Semaphore] = {}

    def slots(self, serving: Serving) -> asyncio.Semaphore:
        """The in-flight slots of ``serving`` (its ``concurrency``), shared by every shard the session runs.

        A long-lived worker starts its next shard while the last answers of the current one are in flight:
        with one limit for both, the new shard's rows take exactly the slots the old one frees.
        """
        slots = self._slots.get(id(serving))
        if slots is None:
            slots = self._slots[id(serving)] = asyncio.Semaphore(max(1, serving.concurrency))
        return slots

    def serving_for(self, spec: RunSpec) -> Serving:
        """The session's serving, built from ``spec`` on first use."""
        if self._serving is None:
            loading = time.monotonic()
            self._serving = build_serving(spec)
            # bench/end_to_end.py counts these lines: model loads per worker process.
            log.info("loaded serving %s in %.2fs (pid %d)", spec.serving, time.monotonic() - loading,
                     os.getpid())
        return self._serving

    def run(self, coroutine):
        """Run ``coroutine`` on the session's event loop (the same loop for every shard)."""
        if self._runner is None:
            self._runner = asyncio.Runner()
        return self._runner.run(coroutine)

    def close(self) -> None:
        """Close the serving (if the session built it) and the event loop."""
        serving, self._serving = self._serving, None
        try:
            if serving is not None:
                if self._runner is not None:
                    self.run(serving.aclose())  # per-loop clients (HTTP sessions) close on their loop
                if self.owns_serving:
                    serving.close()
        finally:
            if self._runner is not None:
                self._runner.close()
                self._runner = None


def quiet_gc() -> None:
    """Fewer, cheaper garbage collections in a worker: the event loop stalls less at hundreds in flight.

    What is loaded by now (modules, the serving's classes) lives as long as the process: frozen out of
    every collection. Young objects are collected every 10,000 allocations instead of 700: a request's
    objects are mostly freed by reference counting anyway; the collector only finds their cycles.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
