"""Storage outages are waited out: transient failures are retried with backoff for ``--storage-patience``."""

from __future__ import annotations

import logging
import os
import time

from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from dfk8s.errors import StorageError

log = logging.getLogger(__name__)

#: Seconds a storage outage is waited out before the operation fails (``DFK8S_STORAGE_PATIENCE``).
DEFAULT_PATIENCE = 120.0


class StorageUnavailable(StorageError):
    """The storage did not answer or answered with a transient error (connection, 5xx, throttling)."""


def storage_patience() -> float:
    """The patience: ``DFK8S_STORAGE_PATIENCE`` seconds, else :data:`DEFAULT_PATIENCE`."""
    value = os.environ.get("DFK8S_STORAGE_PATIENCE")
    try:
        return max(0.0, float(value)) if value else DEFAULT_PATIENCE
    except ValueError:
        return DEFAULT_PATIENCE


def _log_wait(state) -> None:
    exc = state.outcome.exception() if state.outcome else None
    if state.attempt_number == 1 or state.attempt_number % 10 == 0:
        log.warning("storage unavailable, retrying (%.0fs so far): %s", state.seconds_since_start, exc)


def patiently(operation, patience: float | None = None):
    """Run ``operation()``; retry it through transient outages for ``patience`` seconds.

    Raises:
        StorageError: The outage lasted longer than the patience (one line naming how long), or the
            error is not transient (not found, access denied, no such bucket).
    """
    patience = storage_patience() if patience is None else patience
    started = time.monotonic()
    retrying = Retrying(retry=retry_if_exception_type(StorageUnavailable), stop=stop_after_delay(patience),
                        wait=wait_exponential_jitter(initial=0.5, max=10.0, jitter=0.5), reraise=True,
                        before_sleep=_log_wait)
    try:
        return retrying(operation)
    except StorageUnavailable as exc:
        if patience <= 0:
            raise
        raise StorageError(f"storage unavailable for {time.monotonic() - started:.0f}s (--storage-patience "
                           f"{patience:g}): {exc}") from exc
