"""Fetch http(s) input images on a worker (aiohttp), under limits, guarded against SSRF.

The guard: every host is resolved first, and a loopback, private, link-local (169.254.169.254, the
cloud metadata address), multicast, reserved or otherwise non-public address is refused with
``BlockedAddress`` before anything connects, on the first request and after every redirect. The check
runs inside the connector's resolver, so the address checked is the address connected to (no DNS
rebinding between check and connect). Literal IP hosts never reach a resolver and are checked before
the request. ``--allow-private-image-hosts`` lifts the guard; ``--allow-image-network CIDR`` opens
only the networks named.

What it does not cover: a proxy (none is used: ``trust_env`` is off), and whatever the network itself
allows; on Kubernetes the pods' NetworkPolicy is the real boundary.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import urllib.parse
from dataclasses import dataclass

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_exponential_jitter

from dfk8s.errors import retry_after_seconds
from dfk8s.inputs.images import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    CheckedImage,
    ImageProblem,
    check_image,
    check_url,
)
from dfk8s.servings import serving_info

log = logging.getLogger(__name__)

#: Seconds one image fetch may take (``--image-timeout``).
DEFAULT_IMAGE_TIMEOUT = 30.0
#: Redirects followed before a fetch fails.
MAX_REDIRECTS = 5
#: Retries of a 429, a 5xx or a dropped connection.
MAX_FETCH_RETRIES = 3
#: A Retry-After longer than this is cut to it (a row should not wait for an hour).
MAX_RETRY_AFTER = 30.0
_REDIRECTS = (301, 302, 303, 307, 308)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class BlockedAddressError(OSError):
    """A host resolved to an address the guard refuses (raised inside the resolver: no connection)."""

    def __init__(self, host: str, address: str, reason: str):
        super().__init__(f"{host} resolves to {address} ({reason})")
        self.host, self.address, self.reason = host, address, reason


@dataclass(frozen=True)
class AddressGuard:
    """Which addresses images may be fetched from.

    Attributes:
        allow_private: Allow every address (``--allow-private-image-hosts``).
        allowed_networks: Networks allowed although not public (``--allow-image-network``).
    """

    allow_private: bool = False
    allowed_networks: tuple = ()

    @classmethod
    def from_options(cls, options: dict) -> AddressGuard:
        """Build from the run's options.

        Raises:
            SpecError: A network is not valid CIDR.
        """
        from dfk8s.errors import SpecError

        networks = []
        for text in options.get("allowed_image_networks") or ():
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise SpecError(f"--allow-image-network {text!r} is not a network (e.g. 10.20.0.0/16)") \
                    from None
        return cls(bool(options.get("allow_private_image_hosts")), tuple(networks))

    def blocked_reason(self, address: str) -> str | None:
        """Why ``address`` is refused, or None when it may be fetched from."""
        if self.allow_private:
            return None
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return "not an IP address"
        if any(ip in net for net in self.allowed_networks if net.version == ip.version):
            return None
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            return self.blocked_reason(str(embedded))
        for reason, flag in (("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
                             ("multicast", ip.is_multicast), ("unspecified", ip.is_unspecified),
                             ("reserved", ip.is_reserved), ("private", ip.is_private),
                             ("not public", not ip.is_global)):
            if flag:
                return reason
        return None

    def check_address(self, host: str, address: str) -> None:
        """Raise :class:`BlockedAddressError` if ``host``'s ``address`` is refused."""
        reason = self.blocked_reason(address)
        if reason is not None:
            raise BlockedAddressError(host, address, reason)

    def check_literal(self, host: str | None, url: str) -> None:
        """Refuse a URL whose host is a literal IP address in a blocked range (no lookup needed).

        Raises:
            ImageProblem: ``BlockedAddress``.
        """
        if not host or (":" not in host and not host.replace(".", "").isdigit()):
            return  # a name (an IP literal is digits and dots, or has ':'): checked when it is resolved
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return  # a name: checked when it is resolved
        try:
            self.check_address(host, host)
        except BlockedAddressError as exc:
            raise blocked_problem(url, exc) from None


def _embedded_ipv4(ip) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside an IPv4-mapped, NAT64, 6to4 or Teredo IPv6 address."""
    if ip.version != 6:
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def blocked_problem(url: str, exc: BlockedAddressError) -> ImageProblem:
    """The row's ``BlockedAddress`` error for a refused URL."""
    return ImageProblem(f"image {url}: {exc}: refused (--allow-private-image-hosts lifts this)",
                        type="BlockedAddress", details={"url": url, "address": exc.address})


class GuardedResolver:
    """An aiohttp resolver that checks every address it returns; the connector connects only to those.

    Args:
        guard: The address policy.
        lookup: ``async (host, port, family) -> list of aiohttp ResolveResult`` (default: aiohttp's
            ThreadedResolver, i.e. the system's getaddrinfo). Tests inject names here.
    """

    def __init__(self, guard: AddressGuard, lookup=None):
        self.guard = guard
        self._lookup = lookup
        self._threaded = None

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict]:
        """Resolve ``host`` and refuse it if any of its addresses is blocked."""
        if self._lookup is not None:
            results = await self._lookup(host, port, family)
        else:
            if self._threaded is None:
                from aiohttp.resolver import ThreadedResolver

                self._threaded = ThreadedResolver()
            results = await self._threaded.resolve(host, port, family)
        for result in results:
            # One bad address refuses the name: otherwise a round-robin record could still reach it.
            self.guard.check_address(host, result["host"])
        return results

    async def close(self) -> None:
        """Nothing to release."""


class _Retryable(Exception):
    def __init__(self, problem: ImageProblem, retry_after: float | None = None):
        super().__init__(str(problem))
        self.problem, self.retry_after = problem, retry_after


class _WaitRetryAfter:
    """Honour Retry-After (capped), else exponential backoff with jitter."""

    def __init__(self):
        self.backoff = wait_exponential_jitter(initial=0.5, max=10)

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            return min(max(exc.retry_after, 0.0), MAX_RETRY_AFTER)
        return self.backoff(state)


class ImageFetcher:
    """Fetches and checks http(s) images for one worker; build it inside the worker's event loop.

    Args:
        guard: The address policy.
        timeout: Seconds per attempt (``--image-timeout``).
        max_bytes / max_pixels: The same limits as local images.
        max_redirects: Redirects followed, each target checked again.
        max_retries: Retries of 429, 5xx and dropped connections (Retry-After is honoured).
        concurrency: Connections at once.
        lookup: Name lookup for the guarded resolver (tests).
    """

    def __init__(self, guard: AddressGuard, *, timeout: float = DEFAULT_IMAGE_TIMEOUT,
                 max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_redirects: int = MAX_REDIRECTS, max_retries: int = MAX_FETCH_RETRIES,
                 concurrency: int = 16, lookup=None):
        self.guard = guard
        self.timeout = timeout
        self.max_bytes, self.max_pixels = max_bytes, max_pixels
        self.max_redirects, self.max_retries = max_redirects, max_retries
        self.concurrency = concurrency
        self.lookup = lookup
        self._session = None

    @classmethod
    def from_spec(cls, spec) -> ImageFetcher:
        """Build from a run spec's options (``image_timeout``, the guard's allowances)."""
        return cls(AddressGuard.from_options(spec.options),
                   timeout=float(spec.option("image_timeout", DEFAULT_IMAGE_TIMEOUT)),
                   concurrency=max(16, serving_info(spec.serving).concurrency(spec.options)))

    def _client(self):
        import aiohttp

        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.guard, self.lookup),
                                             limit=self.concurrency, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector, trust_env=False,  # no proxy: we connect to what we checked
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"User-Agent": "dfk8s-image-fetch/1", "Accept": "image/*"})
        return self._session

    async def close(self) -> None:
        """Close the HTTP session (inside the loop that made it)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(self, url: str) -> CheckedImage:
        """Fetch ``url`` and check it decodes within the limits.

        Raises:
            ImageProblem: ``BlockedAddress``, ``ImageFetchError`` (HTTP status or network error, with
                ``status`` in its details where there is one) or ``BadImage`` (too big, undecodable).
        """
        attempts = 0
        try:
            async for attempt in AsyncRetrying(stop=stop_after_attempt(self.max_retries + 1),
                                               wait=_WaitRetryAfter(),
                                               retry=retry_if_exception_type(_Retryable), reraise=True):
                with attempt:
                    attempts += 1
                    data = await self._get(url)
        except _Retryable as exc:  # still failing after the retries: a later `dfk8s retry` may pass
            exc.problem.details.update(fetch_attempts=attempts, transient=True)
            raise exc.problem from None
        except ImageProblem as exc:
            exc.details.setdefault("fetch_attempts", attempts)
            raise
        except Exception as exc:  # never let one URL take the shard down
            log.exception("unexpected error fetching %s", url)
            raise ImageProblem(f"image {url}: {type(exc).__name__}: {exc}"[:500], type="ImageFetchError",
                               details={"url": url}) from None
        # Off the loop: checking a large image takes long enough to stall every other fetch.
        return await asyncio.to_thread(check_image, data, url, max_pixels=self.max_pixels)

    async def _get(self, url: str) -> bytes:
        import aiohttp

        current = url
        for _ in range(self.max_redirects + 1):
            parts = check_url(current)
            self.guard.check_literal(parts.hostname, current)
            try:
                async with self._client().get(current, allow_redirects=False) as response:
                    if response.status in _REDIRECTS:
                        location = response.headers.get("Location")
                        if not location:
                            raise _fetch_error(url, f"HTTP {response.status} redirect without a Location",
                                               response.status)
                        current = urllib.parse.urljoin(current, location)
                        continue
                    if response.status == 429 or response.status >= 500:
                        raise _Retryable(_fetch_error(url, f"HTTP {response.status} {response.reason or ''}"
                                                      .strip(), response.status),
                                         retry_after_seconds(response.headers.get("Retry-After")))
                    if not 200 <= response.status < 300:
                        raise _fetch_error(url, f"HTTP {response.status} {response.reason or ''}".strip(),
                                           response.status)
                    return await self._body(url, response)
            except aiohttp.ClientConnectorError as exc:
                cause = exc.os_error if isinstance(exc.os_error, BlockedAddressError) else exc.__cause__
                if isinstance(cause, BlockedAddressError):
                    raise blocked_problem(current, cause) from None
                if isinstance(exc, aiohttp.ClientConnectorDNSError):
                    raise _fetch_error(url, f"cannot resolve {parts.hostname}: {exc.os_error}") from None
                raise _Retryable(_fetch_error(url, f"network error: {exc.os_error or exc}")) from None
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError,
                    aiohttp.ClientOSError) as exc:
                raise _Retryable(_fetch_error(url, f"network error: {type(exc).__name__}: {exc}")) from None
            except TimeoutError:
                raise _fetch_error(url, f"timed out after {self.timeout:g}s", transient=True) from None
            except aiohttp.InvalidURL as exc:
                raise ImageProblem(f"image {url} is not a valid URL: {exc}") from None
            except aiohttp.ClientError as exc:
                raise _fetch_error(url, f"network error: {type(exc).__name__}: {exc}",
                                   transient=True) from None
        raise _fetch_error(url, f"more than {self.max_redirects} redirects")

    async def _body(self, url: str, response) -> bytes:
        length = response.content_length
        if length is not None and length > self.max_bytes:
            raise ImageProblem(f"image {url} is {length} bytes, over the {self.max_bytes} byte limit",
                               details={"url": url})
        data = bytearray()
        async for chunk in response.content.iter_chunked(1 << 16):
            data += chunk
            if len(data) > self.max_bytes:  # a body longer than it said, or one with no length
                raise ImageProblem(f"image {url} is over the {self.max_bytes} byte limit",
                                   details={"url": url})
        return bytes(data)


def _fetch_error(url: str, message: str, status: int | None = None, *,
                 transient: bool = False) -> ImageProblem:
    """An ``ImageFetchError``; ``transient`` marks one a plain ``dfk8s retry`` sends again.

    Transient: a timeout, a network error, 429/5xx after the fetcher's retries. A 404, a host name that
    does not resolve or a redirect loop stays failed.
    """
    details = {"url": url} | ({"status": status} if status is not None else {})
    if transient:
        details["transient"] = True
    return ImageProblem(f"image {url}: {message}", type="ImageFetchError", details=details)


def fetch_image_bytes(url: str, options: dict | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Fetch one image URL from synchronous code (the worker itself fetches on its event loop).

    Args:
        url: The http(s) URL.
        options: Run options with the guard's allowances (``allow_private_image_hosts``, ...).
        max_bytes: Byte limit.

    Raises:
        ImageProblem: As :meth:`ImageFetcher.fetch`.
    """
    options = options or {}

    async def go() -> bytes:
        fetcher = ImageFetcher(AddressGuard.from_options(options), max_bytes=max_bytes,
                               timeout=float(options.get("image_timeout") or DEFAULT_IMAGE_TIMEOUT))
        try:
            return (await fetcher.fetch(url)).data
        finally:
            await fetcher.close()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(go())
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:  # called from inside a loop: give the fetch a loop of its own
        return pool.submit(asyncio.run, go()).result()
