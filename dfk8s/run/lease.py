"""``lease.json``: the one live launcher of a run. A second launcher is refused while the lease is fresh."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from dfk8s.errors import NotFound, RunBusy, StorageError
from dfk8s.run import layout

log = logging.getLogger(__name__)

#: Seconds between heartbeats of a live launcher.
HEARTBEAT_SECONDS = 3.0
#: A lease whose heartbeat is older than this is stale (its launcher died): it may be taken over. A lease
#: of this machine whose launcher is gone (same host and boot, no such process) is stale at once.
STALE_SECONDS = 15.0


def _boot_id() -> str | None:
    """This boot of this machine (Linux); a lease written before a reboot names another one."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, Linux): tells it from a later one of its pid."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def launcher_gone(lease: dict) -> bool:
    """Whether the lease's launcher ran on this machine, in this boot, and its process is gone.

    False when that cannot be told (another host, no ``/proc``): the heartbeat rule decides then.
    """
    if lease.get("host") != socket.gethostname() or not lease.get("boot_id") or not lease.get("pid"):
        return False
    if lease["boot_id"] != _boot_id():
        return True  # written before this machine rebooted: its launcher is gone
    pid = int(lease["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    started = lease.get("pid_started")
    return bool(started) and _process_start(pid) not in (None, started)  # its pid was reused


class RunLease:
    """Hold ``lease.json`` of a run while launching it (a context manager); heartbeats in a thread.

    Args:
        storage: The run's storage.
        stale_after: Seconds after which another launcher's silent lease no longer counts.
        heartbeat: Seconds between heartbeats.
        command: What holds the lease (``run``, ``retry``), shown to a refused launcher.
    """

    def __init__(self, storage, *, stale_after: float = STALE_SECONDS, heartbeat: float = HEARTBEAT_SECONDS,
                 command: str = "run"):
        self.storage = storage
        self.stale_after = stale_after
        self.heartbeat = heartbeat
        self.command = command
        self.owner = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started_at = time.time()
        #: What the launcher sees of its run (rows done, rows/s, ETA): ``dfk8s status`` shows it.
        self.facts: dict = {}

    def _body(self) -> dict:
        return {"owner": self.owner, "command": self.command, "pid": os.getpid(),
                "pid_started": _process_start(os.getpid()), "host": socket.gethostname(),
                "boot_id": _boot_id(), "started_at": round(self.started_at, 3),
                "heartbeat": round(time.time(), 3), "stale_after": self.stale_after, **self.facts}

    def _current(self) -> dict | None:
        try:
            lease = self.storage.read_json(layout.LEASE_KEY)
        except (NotFound, ValueError):
            return None
        return lease if isinstance(lease, dict) else None

    def _refuse_if_live(self, lease: dict | None) -> None:
        if not lease or lease.get("owner") == self.owner or launcher_gone(lease):
            return
        age = time.time() - float(lease.get("heartbeat", 0))
        if age < float(lease.get("stale_after", self.stale_after)):
            raise RunBusy(f"run {self.storage.url()} is already being launched by `dfk8s "
                          f"{lease.get('command', 'run')}` (pid {lease.get('pid')} on {lease.get('host')}, "
                          f"heartbeat {max(0.0, age):.0f}s ago); wait for it to end, or stop it first")

    def acquire(self) -> RunLease:
        """Take the lease, or raise :class:`RunBusy` while another launcher's lease is fresh.

        Where there is no lease yet and the storage can create a key exclusively (a local folder: a hard
        link), it is created that way, so of two launchers that start at once exactly one gets it.
        Otherwise (S3, or taking over a stale lease) it is written, then read back 0.2 s later: of two
        launchers that wrote at once the later write wins and the other backs off.
        """
        current = self._current()
        self._refuse_if_live(current)
        create_exclusive = getattr(self.storage, "create_exclusive", None)
        if current is None and create_exclusive is not None:
            if not create_exclusive(layout.LEASE_KEY, json.dumps(self._body()).encode()):
                self._refuse_if_live(self._current())  # another launcher created it a moment ago
                raise RunBusy(f"run {self.storage.url()} is being launched by another `dfk8s` right now")
        else:
            self.storage.write_json(layout.LEASE_KEY, self._body())
            time.sleep(0.2)
            self._refuse_if_live(self._current())
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                self.storage.write_json(layout.LEASE_KEY, self._body())
            except StorageError as exc:  # a storage blip: the next beat tries again
                log.debug("lease heartbeat failed: %s", exc)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        try:
            lease = self._current()
            if lease is not None and lease.get("owner") == self.owner:
                self.storage.delete(layout.LEASE_KEY)
        except StorageError as exc:
            log.warning("could not remove %s: %s", self.storage.url(layout.LEASE_KEY), exc)

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def read_lease(storage) -> dict | None:
    """The run's lease.json with ``live`` added (its launcher is running now), or None without one."""
    try:
        lease = storage.read_json(layout.LEASE_KEY)
    except (NotFound, ValueError, StorageError):
        return None
    if not isinstance(lease, dict):
        return None
    age = time.time() - float(lease.get("heartbeat", 0))
    lease["heartbeat_age"] = round(max(0.0, age), 1)
    lease["live"] = age < float(lease.get("stale_after", STALE_SECONDS)) and not launcher_gone(lease)
    return lease
