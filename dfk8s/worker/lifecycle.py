"""How a worker stops: a stop request (SIGTERM, SIGINT, SIGHUP, its launcher gone) that running code obeys.

A stop never kills work in the middle: the worker stops taking rows, lets requests in flight finish
within the grace period, checkpoints everything finished and exits with :data:`EXIT_STOPPED` (retryable),
so nothing finished is paid for twice.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading

#: Environment variable a worker gets with its launcher's pid: it stops when that process is gone.
PARENT_PID_ENV = "DFK8S_PARENT_PID"

log = logging.getLogger(__name__)

#: Seconds requests in flight get to finish after a stop request (``DFK8S_GRACE_SECONDS`` overrides).
#: Kubernetes waits 30 s (terminationGracePeriodSeconds) before SIGKILL; 20 s leaves room to checkpoint.
DEFAULT_GRACE_SECONDS = 20.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def grace_seconds() -> float:
    """The grace period: ``DFK8S_GRACE_SECONDS``, else :data:`DEFAULT_GRACE_SECONDS`."""
    value = os.environ.get("DFK8S_GRACE_SECONDS")
    try:
        return max(0.0, float(value)) if value else DEFAULT_GRACE_SECONDS
    except ValueError:
        return DEFAULT_GRACE_SECONDS


class StopToken:
    """A stop request, set from a signal handler or another thread, awaited by the worker's event loop."""

    def __init__(self):
        self._flag = threading.Event()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._lock = threading.Lock()
        self.reason = ""

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for."""
        return self._flag.is_set()

    def request(self, reason: str) -> None:
        """Ask running code to stop (safe from a signal handler and from any thread)."""
        if self._flag.is_set():
            return
        self.reason = reason
        self._flag.set()
        with self._lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed
                pass

    def event(self) -> asyncio.Event:
        """An asyncio event of the running loop that is set when a stop is requested."""
        loop = asyncio.get_running_loop()
        with self._lock:
            for known_loop, event in self._waiters:
                if known_loop is loop:
                    return event
            event = asyncio.Event()
            self._waiters = [(lp, ev) for lp, ev in self._waiters if not lp.is_closed()]
            self._waiters.append((loop, event))
        if self._flag.is_set():
            event.set()
        return event

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a stop is requested (or ``timeout``); returns whether it was."""
        return self._flag.wait(timeout)


def install_stop_signals(token: StopToken) -> None:
    """Turn SIGTERM, SIGINT and SIGHUP into stop requests on ``token`` (main thread only)."""
    def handler(signum, _frame):
        name = signal.Signals(signum).name
        log.warning("%s: stopping after the requests in flight (grace %.0fs)", name, grace_seconds())
        token.request(name)

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)


def watch_parent(token: StopToken, parent_pid: int | None = None, interval: float = 1.0) -> None:
    """Stop when the launcher that started this process is gone, even if it was SIGKILLed.

    Linux sends SIGTERM at once through ``PR_SET_PDEATHSIG``; a thread polling the parent pid covers the
    race before prctl and other systems.
    """
    if parent_pid is None:
        value = os.environ.get(PARENT_PID_ENV, "")
        parent_pid = int(value) if value.isdigit() else None
    if parent_pid is None:
        return
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the polling thread still notices
            pass

    def poll():
        while not token.wait(interval):
            if os.getppid() != parent_pid:
                log.warning("the launcher (pid %d) is gone: stopping", parent_pid)
                token.request("launcher gone")
                return

    if os.getppid() != parent_pid:
        token.request("launcher gone")
        return
    threading.Thread(target=poll, name="parent-watch", daemon=True).start()
