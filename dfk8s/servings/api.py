"""The shared machinery of API servings: in-flight limit, rate limit, retries with Retry-After.

Every API serving (chat, OpenAI images, Gemini images) subclasses :class:`ApiServing` and only writes
``call`` (one request) and ``classify`` (is this exception worth retrying?). The worker keeps
``concurrency`` requests in flight; this class adds the ``--rpm`` limiter (aiolimiter) and the retries
(tenacity), so no serving writes its own loop.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
from dataclasses import dataclass

from aiolimiter import AsyncLimiter
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_exponential_jitter

from dfk8s.errors import ServingUnavailable, SpecError
from dfk8s.servings.base import Request, Response, RowError, Serving
from dfk8s.servings.breaker import Breaker

log = logging.getLogger(__name__)

#: Longest Retry-After we honour; a server asking for more is capped so a shard cannot stall for hours.
MAX_RETRY_AFTER = 120.0


class RetryableError(Exception):
    """A failure worth another attempt (429, 5xx, timeout, malformed body)."""

    def __init__(self, kind: str, message: str, retry_after: float | None = None,
                 details: dict | None = None):
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after
        self.details = details or {}


class RowFailure(Exception):
    """A failure of this row that retrying cannot fix (refusal, bad request, no image returned)."""

    def __init__(self, kind: str, message: str, details: dict | None = None, *, systematic: bool = False):
        super().__init__(message)
        self.kind = kind
        self.details = details or {}
        #: The failure names a run-wide mistake (bad key, model, endpoint, host): the breaker trips at once.
        self.systematic = systematic


@dataclass(frozen=True)
class ApiOptions:
    """Options every API serving shares (the core's ``--api-url`` ... ``--max-retries``).

    Built by :meth:`from_spec`: an option no flag set comes from the serving's registered defaults
    (:class:`dfk8s.servings.ServingInfo`), through :meth:`dfk8s.run.spec.RunSpec.option`.
    """

    api_url: str | None
    model: str
    max_concurrency: int
    timeout: float
    max_retries: int
    rpm: float | None = None

    @classmethod
    def from_spec(cls, spec) -> ApiOptions:
        """Read the shared options; the ``--rpm`` budget is split across the run's parallel workers."""
        rpm = worker_rpm(spec)
        return cls(api_url=spec.option("api_url") or os.environ.get("DF_BASE_URL") or None,
                   model=spec.option("model"), max_concurrency=int(spec.option("max_concurrency")),
                   rpm=rpm, timeout=float(spec.option("timeout")),
                   max_retries=int(spec.option("max_retries")))


def worker_rpm(spec) -> float | None:
    """This worker's share of the run's ``--rpm``: split across the workers that really run at once."""
    rpm = spec.option("rpm")
    return float(rpm) / max(1, min(spec.parallelism, spec.shards or 1)) if rpm else None


class PerLoop:
    """Builds a value once per event loop: SDK clients hold connection pools bound to the loop they met."""

    def __init__(self, factory):
        self.factory = factory
        self._loop = None
        self._value = None

    def get(self):
        """The value for the running loop."""
        import asyncio

        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._value, self._loop = self.factory(), loop
        return self._value

    async def aclose(self) -> None:
        """Close the value made for the running loop, if any (SDK clients have ``close()``)."""
        import asyncio

        value, self._value = self._value, None
        if value is not None and self._loop is asyncio.get_running_loop():
            closer = getattr(value, "close", None) or getattr(value, "aclose", None)
            if closer is not None:
                result = closer()
                if asyncio.iscoroutine(result):
                    await result
        self._loop = None


@dataclass(frozen=True)
class _Attempt:
    """What a wait reads of tenacity's RetryCallState: the row's attempt number and its failure.

    The first attempt runs outside tenacity, and tenacity counts the rest from 1: this carries the row's
    own count to the wait, so backoff grows as if every attempt had run inside tenacity.
    """

    attempt_number: int
    error: BaseException | None

    @property
    def outcome(self) -> _Attempt:
        """Itself: ``outcome.exception()`` is the failure."""
        return self

    def exception(self) -> BaseException | None:
        """The attempt's failure."""
        return self.error


class _WaitRetryAfter:
    """Wait what the server asked for in Retry-After, else exponential backoff with jitter."""

    def __init__(self):
        self.backoff = wait_exponential_jitter(initial=0.5, max=30.0, jitter=0.5)

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RetryableError) and exc.retry_after is not None:
            return min(max(exc.retry_after, 0.0), MAX_RETRY_AFTER)
        return self.backoff(state)


class ApiServing(Serving):
    """Base of the API servings: one request per row, ``max_concurrency`` rows in flight."""

    batch_size = 1

    def __init__(self, options: ApiOptions):
        self.options = options
        self.concurrency = max(1, options.max_concurrency)
        self.limiter = AsyncLimiter(options.rpm, 60.0) if options.rpm else None
        self.wait = _WaitRetryAfter()
        self.breaker = Breaker()

    @abc.abstractmethod
    async def call(self, request: Request) -> Response:
        """Send one request; raise RetryableError, RowFailure or SpecError; return the response."""

    async def run(self, batch: list[Request]) -> list[Response | RowError]:
        """Run each request through :meth:`run_one`; one result per request, in order."""
        return [await self.run_one(request) for request in batch]

    async def aclose(self) -> None:
        """Close every per-loop client attribute (instances of :class:`PerLoop`)."""
        for value in vars(self).values():
            if isinstance(value, PerLoop):
                await value.aclose()

    async def run_one(self, request: Request) -> Response | RowError:
        """Call with rate limit and retries; turn the last failure into a RowError.

        Raises:
            SystematicFailure: The circuit breaker is open (this row is not sent), or this row's failure
                tripped it (the row stays unprocessed, so a resume sends it again).
        """
        probe = await self.breaker.enter()
        try:
            result, signature, systematic = await self._attempts(request)
        finally:
            if probe:
                await self.breaker.leave()
        if isinstance(result, RowError):
            tripped = self.breaker.failure(result.type, signature, systematic=systematic)
            if tripped is not None:
                raise tripped
        else:
            self.breaker.success()
        return result

    async def _attempts(self, request: Request) -> tuple[Response | RowError, str, bool]:
        """The attempts of one row: its result, the failure's message without attempt counts, systematic.

        The first attempt runs outside tenacity (most rows need only one; building the retry machinery
        for each was ~10% of a worker's CPU at a thousand rows/s); a retryable failure continues in
        tenacity with the same stop and wait rules as if it had run there from the start.
        """
        attempts = 1
        try:
            try:
                return await self._attempt(request, 1), "", False
            except RetryableError as exc:
                if exc.kind == "ConnectionRefused" and self.breaker.armed:
                    # Nothing has answered yet: a wrong host or port, not a blip. Trip as an unknown
                    # host does, instead of retrying for half a minute first.
                    raise RowFailure(exc.kind, str(exc), exc.details, systematic=True) from None
                if self.options.max_retries < 1:
                    raise
                await asyncio.sleep(self.wait(_Attempt(1, exc)))
            retrying = AsyncRetrying(stop=stop_after_attempt(self.options.max_retries),
                                     wait=lambda state: self.wait(_Attempt(
                                         state.attempt_number + 1,
                                         state.outcome.exception() if state.outcome else None)),
                                     retry=retry_if_exception(lambda e: isinstance(e, RetryableError)),
                                     reraise=True)
            async for attempt in retrying:
                with attempt:
                    attempts = attempt.retry_state.attempt_number + 1
                    return await self._attempt(request, attempts), "", False
        except RetryableError as exc:
            message = f"gave up after {attempts} attempt{'s' if attempts != 1 else ''}: {exc}"
            return RowError(exc.kind, message, attempts, dict(exc.details)), str(exc), False
        except RowFailure as exc:
            return RowError(exc.kind, str(exc), attempts, dict(exc.details)), str(exc), exc.systematic
        except (SpecError, ServingUnavailable):
            raise  # SystematicFailure included: the breaker is open; a serving down stops the shard
        except Exception as exc:  # an SDK or decoding surprise fails this row only
            log.debug("row %s failed", request.row_id, exc_info=True)
            message = _one_line(exc)
            return RowError(type(exc).__name__, message, attempts), message, False
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def _attempt(self, request: Request, number: int) -> Response:
        self.breaker.check()  # another row tripped it while this one waited to retry
        if self.limiter is not None:
            await self.limiter.acquire()
        response = await self.call(request)
        response.attempts = number
        return response


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:500]
