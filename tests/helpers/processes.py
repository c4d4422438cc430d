"""Servers the suite starts die with the suite, even when it is killed (SIGKILL, a CI timeout)."""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    As a ``preexec_fn`` it runs in the child between fork and exec, so a server started by a test process
    is killed when that process dies without cleaning up. Elsewhere it is a no-op.
    """
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig))
    except (OSError, AttributeError):
        pass


def wait_while_running(procs: dict, log, check, what: str, deadline: float, *, tail: int = 20) -> None:
    """Poll ``check()`` until it is true; fail at once, with its log, if one of ``procs`` exits.

    Args:
        procs: name -> :class:`subprocess.Popen` of the servers being waited for.
        log: ``log(name, lines)`` gives a server's last log lines.
        check: What is waited for (an exception counts as not yet).
        what: Its name, for the timeout message.
        deadline: ``time.monotonic()`` to give up at.
        tail: Log lines of each server in the timeout message.
    """
    import time

    while time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log(name)}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.5)
    logs = "\n".join(f"--- {name}\n{log(name, tail)}" for name in procs)
    raise TimeoutError(f"timed out waiting for {what}\n{logs}")
