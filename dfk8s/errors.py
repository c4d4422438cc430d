"""The one error tree of dfk8s; the CLI turns each error into one clear line."""

from __future__ import annotations

#: Exit code for "this shard can never succeed": a bad spec, a bad shard, missing credentials.
EXIT_DO_NOT_RETRY = 42


class Dfk8sError(Exception):
    """Base class of every error dfk8s raises on purpose."""

    exit_code = 1


class SpecError(Dfk8sError):
    """The run spec, a flag or the credentials are wrong; retrying cannot help."""

    exit_code = EXIT_DO_NOT_RETRY


class UsageError(SpecError):
    """The command as given cannot start: a flag, a path or the manifest is wrong, and nothing was sent.

    Exit 2, as click's own usage errors: the fix is in the command line (see the README's exit codes).
    """

    exit_code = 2


class SystematicFailure(SpecError):
    """Every request fails the same way (unknown model, bad key, bad URL, unresolvable host): stop paying.

    Raised by a serving's circuit breaker. The worker keeps the rows that finished, leaves the unsent
    ones unprocessed (a resume sends them), writes ``breaker.json`` at the run root and exits 42.

    Attributes:
        type: The failure's type, as its error records would name it (``ModelNotFound``, ``DNSError``).
        message: What the server (or the network) said, first 500 characters.
        hint: What to change (``check --model``).
    """

    def __init__(self, type: str, message: str, hint: str = ""):  # noqa: A002 - the error record's key
        self.type = type
        self.message = message[:500]
        self.hint = hint
        super().__init__(f"stopped early: every request failed with {type}: {self.message}"
                         + (f"; {hint}" if hint else ""))

    def to_dict(self) -> dict:
        """The ``breaker.json`` body (the worker adds the shard index)."""
        return {"type": self.type, "message": self.message, "hint": self.hint}


class ManifestError(Dfk8sError):
    """The manifest cannot be read at all (as opposed to one bad row, which becomes an error record)."""

    exit_code = 2

    def __init__(self, message: str, *, source: str = "", line: int | None = None):
        self.source = source
        self.line = line
        where = f"{source}:{line}: " if line is not None else (f"{source}: " if source else "")
        super().__init__(f"{where}{message}")


class StorageError(Dfk8sError):
    """A storage operation failed (permissions, endpoint unreachable, ...)."""


class NotFound(StorageError):
    """A key does not exist in storage."""

    def __init__(self, key: str):
        self.key = key
        super().__init__(f"not found: {key}")


class ServingUnavailable(Dfk8sError):
    """The serving cannot work right now (model download failed, GPU busy); the shard should be retried."""

    exit_code = 1


class ShardError(Dfk8sError):
    """A shard cannot be processed (missing or corrupt input); retrying cannot help."""

    exit_code = EXIT_DO_NOT_RETRY


class RunNotFound(Dfk8sError):
    """No run with this id exists under the output location."""

    exit_code = 2


class KubernetesError(Dfk8sError):
    """The cluster refused or failed a request."""


class WorkerStopped(Dfk8sError):
    """A worker was asked to stop (SIGTERM, its launcher gone); it checkpointed what finished. Retry it."""

    exit_code = 143

    def __init__(self, message: str, *, reason: str = ""):
        self.reason = reason
        super().__init__(message)


class RunBusy(Dfk8sError):
    """Another launcher holds the run's lease (lease.json is fresh): two launchers would race."""

    exit_code = 3


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds an error response's ``Retry-After`` header asks to wait: delay-seconds or an HTTP date.

    The one parser of that header (API servings, image fetches, the Kubernetes API). Returns None when
    there is no header or it cannot be read; a date in the past gives 0.
    """
    if value is None or not str(value).strip():
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    import datetime
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(str(value))
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())
