"""The local executor: long-lived worker processes on this machine, shards retried per index like a Job.

Each worker is ``dfk8s worker --serve``: it imports once, builds its serving once (HTTP session, FLUX on its
GPUs) and takes shard after shard from this executor over a pipe. The executor owns its workers: a signal
to the launcher (SIGINT, SIGTERM, SIGHUP) stops them gracefully (they checkpoint what finished), and a
launcher killed outright leaves workers that notice within a second and stop the same way.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from dfk8s.errors import EXIT_DO_NOT_RETRY, Dfk8sError, SpecError, StorageError
from dfk8s.executors.base import Cancelled, Executor, cancel_provider_batches
from dfk8s.executors.local.early import EarlyWorkers, needs_gpus, spawn_workers
from dfk8s.executors.local.pipe import (
    SHARDS_AT_ONCE,
    close_input,
    read_replies,
    send_shard,
    spawn_worker,
    worker_log_dir,
)
from dfk8s.reduce.reducer import Summary, reduce_run
from dfk8s.run import breaker, layout
from dfk8s.run.progress import (
    PLAIN_LINE_SECONDS,
    ProgressReader,
    describe_facts,
    logs_above,
    progress_bar,
    progress_facts,
)
from dfk8s.run.spec import RunSpec
from dfk8s.run.status import RunStatus, storage_status
from dfk8s.worker.lifecycle import grace_seconds

log = logging.getLogger(__name__)

#: Seconds past the grace period a stopping worker gets to write its checkpoint before SIGKILL.
CHECKPOINT_MARGIN = 10.0


class Interrupted(Dfk8sError):
    """The user (or a signal) stopped the run; it can be resumed with the same run id."""

    exit_code = 130

    def __init__(self, run_id: str, signal_name: str = "SIGINT", output: str | None = None):
        self.run_id = run_id
        self.signal_name = signal_name
        self.exit_code = 128 + int(getattr(signal, signal_name, signal.SIGINT))
        where = f" -o {output}" if output else ""
        super().__init__(f"interrupted ({signal_name}); finished rows are checkpointed; resume with --run-id "
                         f"{run_id}: dfk8s run --run-id {run_id}{where}")


class BreakerTripped(Dfk8sError):
    """A worker's circuit breaker stopped the run: every request would fail the same way."""

    exit_code = EXIT_DO_NOT_RETRY

    def __init__(self, breaker: dict, summary: Summary, run_id: str = "", output: str | None = None):
        from dfk8s.servings.breaker import fix_flag

        self.breaker = breaker
        self.summary = summary
        message = breaker.get("message") or "the circuit breaker tripped"
        hint = breaker.get("hint")
        line = f"{message}" + (f"; {hint}" if hint else "")
        if run_id:  # the next step is one command: it sends the rows that failed this way and the rest
            flag = fix_flag(str(breaker.get("type", "")))
            where = f" -o {output}" if output else ""
            line += (f"; then: dfk8s retry {run_id}{where}" + (f" {flag}" if flag else "")
                     + " (it sends every row that failed with this and every unprocessed one)")
        super().__init__(line)


class CannotSucceed(Dfk8sError):
    """Shards stopped with exit 42 for a cause retrying cannot change (a gateway not set up, a bad spec)."""

    exit_code = EXIT_DO_NOT_RETRY

    def __init__(self, messages: dict[int, str], summary: Summary):
        self.summary = summary
        first = next(iter(messages.values()))
        more = f" (and {len(messages) - 1} more shards the same way)" if len(messages) > 1 else ""
        super().__init__(f"{first}{more}; {summary.result} keeps every row, the unsent ones unprocessed")


class _LauncherSignal(KeyboardInterrupt):
    """SIGTERM or SIGHUP to the launcher, raised like Ctrl-C so every path stops the workers."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signal_name = signal.Signals(signum).name


@dataclass
class _Worker:
    number: int
    process: subprocess.Popen
    log_path: Path
    gpus: str | None = None
    #: The shards it runs now (index -> attempt): one, and a second once the first is draining.
    shards: dict[int, int] = field(default_factory=dict)
    #: Those of its shards whose rows are all sent (only answers in flight are left).
    draining: set[int] = field(default_factory=set)
    retiring: bool = False

    def can_take(self) -> bool:
        """Whether to send it a shard: it is idle, or every shard it runs is draining.

        The next shard's rows then fill the slots the draining ones free: no idle tail between shards.
        """
        if self.retiring or len(self.shards) >= SHARDS_AT_ONCE:
            return False
        return not self.shards or set(self.shards) <= self.draining


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use (``CUDA_VISIBLE_DEVICES``, else what torch counts)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch
    except ImportError:
        return []
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def split_gpus(gpus: list[str], workers: int) -> list[str]:
    """Give each local worker its own GPUs, so two workers never load a model onto the same card."""
    workers = max(1, min(workers, len(gpus)))
    return [",".join(gpus[k::workers]) for k in range(workers)]


@dataclass
class LocalRun:
    """A planned run the local executor was asked to start (its workers live while it is followed)."""

    storage: Any
    spec: RunSpec
    only: set[int] | None = None


@dataclass
class LocalExecutor(Executor[LocalRun, Summary]):
    """Runs every unfinished shard of a planned run on long-lived worker processes, then reduces.

    Attributes:
        workers: Worker processes at most (never more than there are shards left).
        shard_retries: Extra attempts for a shard whose worker fails (not for exit 42).
        endpoint_url: S3 endpoint passed to workers as ``AWS_ENDPOINT_URL``.
        show_progress: Draw the progress bar (it switches itself off when stderr is not a terminal).
        poll_seconds: How often the progress is read from storage.
        output: The ``--output`` runs live under (the resume hint; where status and cancel find runs).
        started: ``time.monotonic()`` when this launcher session began (planning included).
    """

    name: ClassVar[str] = "local"

    workers: int = 4
    shard_retries: int = 2
    endpoint_url: str | None = None
    show_progress: bool = True
    poll_seconds: float = 0.5
    output: str | None = None
    started: float = field(default_factory=time.monotonic)
    failed_shards: dict[int, str] = field(default_factory=dict)
    breaker: dict | None = None
    #: The run's lease: its heartbeat carries the progress (``dfk8s status`` of a live run shows it).
    lease: Any = None
    #: Shards that exited 42 for a cause a retry cannot change (not the budget): the run exits 42 too.
    cannot_succeed: dict[int, str] = field(default_factory=dict)
    #: Workers started by :meth:`prestart` (before the plan), and their event queue.
    _early: list[_Worker] = field(default_factory=list, repr=False)
    _events: queue.Queue | None = field(default=None, repr=False)
    _parallelism: int = 1

    # -- workers -------------------------------------------------------------------------------------

    def prestart(self, run_url: str, run_id: str, serving: str | None) -> None:
        """Start the workers now, before the run is planned, so that their start-up overlaps planning.

        Each imports dfk8s and the serving's modules meanwhile and then waits for its first shard (the
        spec is read then). Not for a GPU serving: its GPUs are split by the number of shards to do.
        :meth:`execute` takes these workers over; :meth:`discard` stops them if it never runs.
        """
        if not serving or needs_gpus(serving) or self._early:
            return
        self.adopt(spawn_workers(run_url, run_id, serving, self.workers, endpoint_url=self.endpoint_url))

    def adopt(self, early: EarlyWorkers | None) -> None:
        """Take over workers that :func:`~dfk8s.executors.local.early.start_early` started before the plan."""
        if early is None:
            return
        if self._events is None:
            self._events = queue.Queue()
        for process, log_path in early.take():
            self._early.append(self._watch(_Worker(len(self._early), process, log_path), self._events))

    def discard(self) -> None:
        """Stop the workers :meth:`prestart` started if :meth:`execute` did not take them (a failed plan)."""
        early, self._early = self._early, []
        for worker in early:
            close_input(worker.process)  # at EOF an idle worker exits at once
        if early:
            self._wait(early, self._events, 10.0)

    def _spawn(self, run_url: str, number: int, parallelism: int, gpus: str | None, events: queue.Queue,
               log_dir: Path) -> _Worker:
        process, log_path = spawn_worker(run_url, number, parallelism=parallelism, log_dir=log_dir, gpus=gpus,
                                         endpoint_url=self.endpoint_url)
        return self._watch(_Worker(number, process, log_path, gpus), events)

    @staticmethod
    def _watch(worker: _Worker, events: queue.Queue) -> _Worker:
        threading.Thread(target=read_replies, name=f"worker-{worker.number}", daemon=True, args=(
            worker.process, lambda reply: events.put(("reply", worker, reply)),
            lambda code: events.put(("exit", worker, code)), f"worker {worker.number}")).start()
        return worker

    def _assign(self, worker: _Worker, index: int, attempt: int) -> bool:
        worker.shards[index] = attempt
        return send_shard(worker.process, index, self._parallelism)

    # -- the run -------------------------------------------------------------------------------------

    def execute(self, storage, spec: RunSpec, *, only: set[int] | None = None) -> Summary:
        """Run the shards that have no done marker (those in ``only``, if given), then reduce.

        Raises:
            Interrupted: A signal stopped the run (workers checkpointed; resume with the run id).
            BreakerTripped: A worker's circuit breaker stopped the run (the run is reduced first).
        """
        done = {i for key in storage.list(layout.OUTPUT_PREFIX) if (i := layout.done_index(key)) is not None}
        todo = deque((i, 0) for i in range(spec.shards) if i not in done and (only is None or i in only))
        breaker.clear(storage)  # a breaker of an earlier session is history: this one gets a fresh chance
        log_dir = worker_log_dir(spec.run_id)
        gpu_sets = None
        parallelism = max(1, min(self.workers, len(todo)))
        if needs_gpus(spec.serving) and (gpus := visible_gpus()):
            gpu_sets = split_gpus(gpus, parallelism)  # each worker drives its own GPUs
            parallelism = len(gpu_sets)
        self._parallelism = parallelism
        # The bar does not wait out a storage outage (the workers do): it just stays put meanwhile.
        with_patience = getattr(storage, "with_patience", None)
        reader = ProgressReader(with_patience(2.0) if with_patience else storage)
        first = _poll(reader)
        events: queue.Queue = self._events or queue.Queue()
        workers, self._early = self._early, []  # those prestart() started, if any
        for extra in workers[parallelism:]:  # fewer shards to do than workers: the rest exit at EOF
            extra.retiring = True
            close_input(extra.process)
        numbers = iter(range(len(workers), 1_000_000))
        previous = _trap_launcher_signals()
        try:
            with progress_bar(spec.rows, enabled=self.show_progress) as bar, logs_above(bar):
                task = bar.add_task(spec.run_id, total=spec.rows, completed=first.rows if first else 0,
                                    failed=first.failed if first else 0, rate="-")
                base, began, last_poll = (first.rows if first else 0), time.monotonic(), 0.0
                # Where no bar can be drawn (nohup, CI, a log file), a plain line every ~10 s instead.
                plain = self.show_progress and (bar.disable or not bar.console.is_terminal)
                last_line = time.monotonic()
                try:
                    while todo or any(w.shards for w in workers):
                        self._top_up(storage, workers, todo, parallelism, gpu_sets, events, log_dir, numbers)
                        try:
                            kind, worker, value = events.get(timeout=self.poll_seconds)
                        except queue.Empty:
                            kind = None
                        if kind == "reply":
                            self._on_reply(storage, worker, value, todo)
                        elif kind == "exit":
                            self._on_exit(worker, value, todo, workers)
                        if self.breaker is not None:
                            break
                        if time.monotonic() - last_poll >= self.poll_seconds:
                            last_poll = time.monotonic()
                            if (now := _poll(reader)) is not None:
                                rate = (now.rows - base) / max(1e-6, last_poll - began)
                                note = "; ".join(now.notes)
                                bar.update(task, completed=now.rows, failed=now.failed, rate=f"{rate:,.1f}",
                                           description=f"{spec.run_id} ({note})" if note else spec.run_id)
                                line_due = plain and last_poll - last_line >= PLAIN_LINE_SECONDS
                                if line_due or self.lease is not None:
                                    facts = progress_facts(now.rows, spec.rows, now.ok, now.failed, rate,
                                                           _spend(storage, spec) if line_due else None,
                                                           note or None)
                                    if self.lease is not None:
                                        self.lease.facts = facts
                                    if line_due:
                                        last_line = last_poll
                                        sys.stderr.write(f"{spec.run_id}: {describe_facts(facts)}\n")
                                        sys.stderr.flush()
                except KeyboardInterrupt as exc:
                    self._stop(workers, events)
                    raise Interrupted(spec.run_id, getattr(exc, "signal_name", "SIGINT"),
                                      self.output) from None
                if self.breaker is not None:
                    self._stop(workers, events)
                else:
                    self._finish(workers, events)
                if (now := _poll(reader)) is not None:
                    bar.update(task, completed=now.rows, failed=now.failed)
        finally:
            _restore_signals(previous)
        summary = reduce_run(storage, failed_shards=dict(sorted(self.failed_shards.items())),
                             session_seconds=time.monotonic() - self.started)
        if self.breaker is not None:
            raise BreakerTripped(self.breaker, summary, spec.run_id, self.output)
        if self.cannot_succeed:
            raise CannotSucceed(self.cannot_succeed, summary)
        return summary

    def _top_up(self, storage, workers, todo, parallelism, gpu_sets, events, log_dir, numbers) -> None:
        """Give shards to idle workers, then to draining ones; start workers until ``parallelism`` live."""
        for worker in sorted(workers, key=lambda w: len(w.shards)):  # idle ones first: they have no work
            if todo and worker.can_take():
                index, attempt = todo.popleft()
                self._assign(worker, index, attempt)
        while todo and sum(not w.retiring for w in workers) < parallelism:
            gpus = None
            if gpu_sets is not None:
                gpus = next(g for g in gpu_sets if g not in {w.gpus for w in workers})
            worker = self._spawn(storage.url(), next(numbers), parallelism, gpus, events, log_dir)
            workers.append(worker)
            index, attempt = todo.popleft()
            self._assign(worker, index, attempt)

    def _on_reply(self, storage, worker: _Worker, reply: dict, todo: deque) -> None:
        index = reply.get("index")
        if index not in worker.shards:
            return
        if reply.get("event") == "draining":
            worker.draining.add(index)
            return
        code = int(reply.get("code", 1))
        attempt = worker.shards.pop(index)
        worker.draining.discard(index)
        if code == 0:
            return
        if code == EXIT_DO_NOT_RETRY:
            self.failed_shards[index] = reply.get("message", "")
            if not self.failed_shards[index].startswith("BudgetExceeded"):  # a budget stop is resumable
                self.cannot_succeed[index] = self.failed_shards[index]
            log.error("shard %d cannot succeed: %s", index, reply.get("message", ""))
            found = breaker.read(storage)
            if reply.get("breaker") or found:
                self.breaker = found or {"shard": index,
                                         "message": reply.get("message", "the circuit breaker tripped")}
            return
        worker.retiring = True  # after a retryable failure the worker exits; a fresh one takes over
        self._retry_or_fail(index, attempt, code, reply.get("message", ""), todo)

    def _on_exit(self, worker: _Worker, code: int, todo: deque, workers: list[_Worker]) -> None:
        workers.remove(worker)
        left, worker.shards = worker.shards, {}
        worker.draining.clear()
        for index, attempt in left.items():
            if code == EXIT_DO_NOT_RETRY:
                self.failed_shards[index] = _tail(worker.log_path)
                log.error("shard %d cannot succeed (exit 42): %s", index, self.failed_shards[index])
                continue
            self._retry_or_fail(index, attempt, code, _tail(worker.log_path), todo)

    def _retry_or_fail(self, index: int, attempt: int, code: int, why: str, todo: deque) -> None:
        if attempt >= self.shard_retries:
            self.failed_shards[index] = why
            log.error("shard %d failed %d times (exit %s): %s", index, attempt + 1, code, why)
            return
        log.warning("shard %d stopped with exit %s; retrying (%d/%d): %s", index, code, attempt + 1,
                    self.shard_retries, why)
        todo.append((index, attempt + 1))

    def _finish(self, workers: list[_Worker], events: queue.Queue) -> None:
        """Every shard is done: close the workers' input (they exit at EOF) and wait for them."""
        for worker in workers:
            close_input(worker.process)
        self._wait(workers, events, grace_seconds() + CHECKPOINT_MARGIN)

    def _stop(self, workers: list[_Worker], events: queue.Queue) -> None:
        """Stop the workers gracefully: SIGTERM, then the grace period plus a margin, then SIGKILL.

        A second signal meanwhile kills them at once (the rows they had not checkpointed are redone).
        """
        killed = []

        def kill_now(signum, _frame):
            log.warning("%s again: killing the workers", signal.Signals(signum).name)
            killed.append(signum)
            for worker in workers:
                _signal(worker.process, signal.SIGKILL)

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, kill_now)
        if workers:
            log.warning("stopping %d workers (they checkpoint what finished)", len(workers))
        for worker in workers:
            _signal(worker.process, signal.SIGTERM)
            close_input(worker.process)
        self._wait(workers, events, grace_seconds() + CHECKPOINT_MARGIN)

    @staticmethod
    def _wait(workers: list[_Worker], events: queue.Queue, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        for worker in workers:
            try:
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %d did not stop in time: killing it", worker.number)
                worker.process.kill()
                worker.process.wait()
        while True:  # drop what the reader threads still queue; nobody acts on it any more
            try:
                events.get_nowait()
            except queue.Empty:
                break

    # -- the Executor interface ----------------------------------------------------------------------

    def start(self, storage, spec: RunSpec, *, only: set[int] | None = None) -> LocalRun:
        """Take a planned run (only the shards in ``only``, if given); :meth:`follow` runs it.

        Local workers are children of this process: nothing runs until it follows the run.
        """
        return LocalRun(storage, spec, only)

    def follow(self, handle: LocalRun) -> Summary:
        """Run the shards on the workers, drawing the progress, then reduce (:meth:`execute`)."""
        return self.execute(handle.storage, handle.spec, only=handle.only)

    def status(self, run_id: str) -> RunStatus:
        """The run under ``output``, from its storage alone (no Jobs to ask: ``unreduced`` until reduced)."""
        return storage_status(self._run_storage(run_id))

    def cancel(self, run_id: str) -> Cancelled:
        """Cancel the run's provider batches (batch mode); its workers stop with the process following it."""
        storage = self._run_storage(run_id)
        batches, error = cancel_provider_batches(storage)
        return Cancelled(run_id=run_id, run_uri=storage.url(), batches=batches, batch_error=error)

    def _run_storage(self, run_id: str):
        from dfk8s.plan.launch import run_storage

        if not self.output:
            raise SpecError("the local executor needs the --output its runs live under")
        return run_storage(self.output, run_id, self.endpoint_url)


def _signal(process: subprocess.Popen, sig: int) -> None:
    if process.poll() is None:
        try:
            process.send_signal(sig)
        except ProcessLookupError:
            pass


def _poll(reader: ProgressReader):
    """The progress now, or None while storage does not answer (the bar just waits)."""
    try:
        return reader.poll()
    except StorageError as exc:
        log.debug("progress not readable now: %s", exc)
        return None


def _spend(storage, spec: RunSpec) -> float | None:
    """The run's spend now, for a progress line (None: no price, or storage does not answer)."""
    from dfk8s.cost.budget import run_spend

    try:
        return run_spend(storage, spec.shards)
    except StorageError:
        return None


def _trap_launcher_signals():
    """SIGTERM and SIGHUP stop the run like Ctrl-C (main thread only); returns what to restore."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def raise_signal(signum, _frame):
        raise _LauncherSignal(signum)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGTERM, raise_signal)
    signal.signal(signal.SIGHUP, raise_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return previous


def _restore_signals(previous) -> None:
    if previous:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])[-500:]
