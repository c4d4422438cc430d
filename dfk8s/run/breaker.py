"""The run's circuit-breaker record, ``breaker.json``: the one place it is written, read and cleared.

A worker whose serving's breaker tripped (every request failing the same way: a bad key, model or URL)
writes it once, naming the shard and the cause. Other workers read it before a shard and stop too; the
launcher reads it for its one-line message and ``status`` shows it. A new session (resume or retry) clears
it: the user may have fixed the cause, and a mistake still there trips it again within a few requests.
"""

from __future__ import annotations

import logging

from dfk8s.errors import NotFound, StorageError, SystematicFailure
from dfk8s.run.layout import BREAKER_KEY

log = logging.getLogger(__name__)

__all__ = ["clear", "read", "tripped", "trip"]


def trip(storage, shard: int, failure: BaseException) -> None:
    """Record that shard ``shard`` tripped the breaker with ``failure``, unless a record is there already.

    A storage failure only warns: the worker's exit code 42 still stops the run.
    """
    record = failure.to_dict() if isinstance(failure, SystematicFailure) else {
        "type": type(failure).__name__, "message": str(failure)[:500], "hint": ""}
    try:
        if not storage.exists(BREAKER_KEY):
            storage.write_json(BREAKER_KEY, {"shard": shard, **record})
    except StorageError as exc:
        log.warning("could not write %s: %s", BREAKER_KEY, exc)


def read(storage) -> dict | None:
    """The record (``shard``, ``type``, ``message``, ``hint``), or None when the breaker did not trip."""
    try:
        if not storage.exists(BREAKER_KEY):
            return None
        found = storage.read_json(BREAKER_KEY)
    except (NotFound, StorageError, ValueError):
        return None
    return found if isinstance(found, dict) else {"message": str(found)}


def tripped(storage) -> SystematicFailure | None:
    """The failure the record names, for a worker to stop with; None when the breaker did not trip."""
    found = read(storage)
    if found is None:
        return None
    return SystematicFailure(str(found.get("type", "SystematicFailure")), str(found.get("message", "")),
                             str(found.get("hint", "")))


def clear(storage) -> None:
    """Remove the record (a new session gets a fresh chance); a storage failure is ignored."""
    try:
        if storage.exists(BREAKER_KEY):
            storage.delete(BREAKER_KEY)
    except StorageError:
        pass
