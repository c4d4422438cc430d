"""The circuit breaker of API servings: stop a run whose first requests all fail the same way.

A misspelled ``--model``, a bad key, a wrong ``--api-url`` path or host, or a proxy that answers the
same 400 to everything make every row fail. Without a breaker a run sends all its rows and pays (or
waits) for each. The breaker watches the rows' final outcomes until the first success:

* until then, at most :data:`PROBE_IN_FLIGHT` requests are in flight (a probe), so a mistake costs a
  handful of requests, not the whole ``--max-concurrency``; the first success opens the full limit;
* a failure that names a mistake outright (401/403, 404, an unresolvable host) trips at once;
* otherwise :data:`TRIP_AFTER` final failures in a row with the same type and message trip it.

Once tripped, every further request raises :class:`~dfk8s.errors.SystematicFailure` without being sent.
A success disarms it for good: from then on failures are the rows' own.
"""

from __future__ import annotations

import asyncio

from dfk8s.errors import SystematicFailure

#: Requests in flight until the first success (a probe of the endpoint, the model and the key).
PROBE_IN_FLIGHT = 4
#: Identical final failures, with no success before them, that trip the breaker.
TRIP_AFTER = 5
#: Failure types that belong to one row (its content or its image), never to the run.
ROW_TYPES = frozenset({"Refusal", "BadInput", "BadImage", "NoImage", "EmptyResponse", "BadRow"})

_HINTS = {
    "ModelNotFound": "check --model (the name the endpoint serves; behind a gateway, the name it routes)",
    "NotFound": "check --api-url: the endpoint path does not exist there",
    "AuthenticationError": "check the API key ($DF_API_KEY / $OPENAI_API_KEY / $GEMINI_API_KEY; behind a "
                           "gateway such as LiteLLM, the gateway's key)",
    "PermissionDenied": "check the API key and what it may use",
    "DNSError": "check the host name in --api-url (it does not resolve)",
    "ConnectionRefused": "nothing listens at --api-url; check its host and port, or start the server",
    "Timeout": "the server at --api-url does not answer in time; check it, or raise --timeout",
    "RateLimited": "the API keeps refusing with 429 (a quota?); check the account, or lower --rpm",
    "ServerError": "the server at --api-url fails every request; check it",
}


#: The flag a retry changes to fix each cause (the key is an environment variable, not a flag).
_FIX_FLAGS = {"ModelNotFound": "--model NAME", "NotFound": "--api-url URL", "DNSError": "--api-url URL",
              "ConnectionRefused": "--api-url URL", "Timeout": "--api-url URL (or --timeout SECONDS)",
              "ServerError": "--api-url URL", "RateLimited": "--rpm N"}


def fix_flag(kind: str) -> str:
    """The flag ``dfk8s retry`` takes to fix a systematic failure of type ``kind`` ('' for the key)."""
    if kind in ("AuthenticationError", "PermissionDenied"):
        return ""
    return _FIX_FLAGS.get(kind, "--model NAME / --api-url URL")


def hint_for(kind: str) -> str:
    """What to change for a systematic failure of type ``kind``."""
    return _HINTS.get(kind, "every request got the same answer; check --model, --api-url and the API key "
                            "(a proxy such as LiteLLM answers 400 for its own errors)")


class Breaker:
    """The breaker state of one serving (shared by all its requests, across shards of one worker)."""

    def __init__(self, probe: int = PROBE_IN_FLIGHT, trip_after: int = TRIP_AFTER):
        self.probe = probe
        self.trip_after = trip_after
        self.armed = True  # until the first success
        self.tripped: SystematicFailure | None = None
        self._streak: tuple[str, str] | None = None
        self._count = 0
        self._in_probe = 0
        self._cond: asyncio.Condition | None = None
        self._loop = None

    def _condition(self) -> asyncio.Condition:
        loop = asyncio.get_running_loop()
        if self._cond is None or self._loop is not loop:  # primitives bind to the loop they first meet
            self._cond, self._loop, self._in_probe = asyncio.Condition(), loop, 0
        return self._cond

    def check(self) -> None:
        """Raise the trip's failure if the breaker is open (the request is not sent)."""
        if self.tripped is not None:
            raise self.tripped

    async def enter(self) -> bool:
        """Wait for a probe slot while armed; returns whether this request holds one."""
        self.check()
        if not self.armed:
            return False
        cond = self._condition()
        async with cond:
            await cond.wait_for(lambda: not self.armed or self.tripped is not None
                                or self._in_probe < self.probe)
            self.check()
            if not self.armed:
                return False
            self._in_probe += 1
            return True

    async def leave(self) -> None:
        """Give back a probe slot (and wake everyone when the probe ended)."""
        cond = self._condition()
        async with cond:
            self._in_probe = max(0, self._in_probe - 1)
            cond.notify_all()

    def success(self) -> None:
        """A row succeeded: the endpoint, the model and the key work."""
        self.armed = False

    def failure(self, kind: str, message: str, *, systematic: bool = False) -> SystematicFailure | None:
        """Count a row's final failure; returns the trip's failure when this one trips the breaker.

        Args:
            kind: The error record's type.
            message: Its message (attempt counts stripped by the caller).
            systematic: The failure names a run-wide mistake by itself (401, 404, DNS): trip now.
        """
        if self.tripped is not None:
            return self.tripped
        if not self.armed or kind in ROW_TYPES:
            return None
        signature = (kind, message)
        self._count = self._count + 1 if signature == self._streak else 1
        self._streak = signature
        if systematic or self._count >= self.trip_after:
            self.tripped = SystematicFailure(kind, message, hint_for(kind))
            return self.tripped
        return None
