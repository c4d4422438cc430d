"""The lean request path: the same wire requests as the vendor SDKs, posted with aiohttp and orjson.

At hundreds of requests in flight the openai and google-genai SDKs spend most of a worker's CPU building
requests and validating answers into pydantic models (bench/caption_api.py). This path sends the same
bytes (tests capture both at the fake server and compare them) and reads the same fields from the
answer, with the SDK's work reduced to one ``orjson.dumps`` and one ``orjson.loads``. Retries,
Retry-After, ``--rpm`` and error records stay in :class:`dfk8s.servings.api.ApiServing` and
:mod:`dfk8s.servings.http_errors`, shared with the SDK path; ``--client sdk`` switches back to the SDK.

Image payloads are spliced into the serialized body as base64 bytes: no base64 ``str``, no data-URL
``str`` and no re-encoding of either (one base64 copy, one join).
"""

from __future__ import annotations

import base64
from collections.abc import Callable

import aiohttp
import orjson
import yarl

from dfk8s import __version__
from dfk8s.errors import retry_after_seconds
from dfk8s.servings.api import RetryableError
from dfk8s.servings.http_errors import status_error, transport_error

#: ``--client`` values: the lean path (default) and the vendor SDK (the reference).
CLIENTS = ("fast", "sdk")
_TOKEN = "\x00dfk8s-image-%d\x00"


def client_choice(spec) -> str:
    """The run's ``client`` option (``fast`` unless the spec says ``sdk``)."""
    choice = str(spec.option("client", "fast"))
    if choice not in CLIENTS:
        from dfk8s.errors import SpecError

        raise SpecError(f"--client must be one of {', '.join(CLIENTS)}, not {choice!r}")
    return choice


def dumps_with_images(build: Callable[[Callable], object], *, dumps: Callable[[object], bytes] = orjson.dumps,
                      encode: Callable[[bytes], bytes] = base64.b64encode) -> bytes:
    """Serialize a JSON body whose image payloads are base64 of raw bytes, without base64 strings.

    Args:
        build: Called with ``placeholder(image) -> str``; returns the body, in which each image's base64
            text appears as the placeholder (inside whatever string the wire format wants around it).

        dumps: The serializer (the openai SDK's compact JSON by default; Gemini's SDK sends
            ``json.dumps`` with its default separators).
        encode: The base64 flavour (standard; Gemini's SDK sends URL-safe).

    Returns:
        The bytes ``dumps`` gives the body with the real base64 text in it (what the SDKs send).
    """
    images: list[bytes] = []

    def placeholder(data: bytes) -> str:
        images.append(data)
        return _TOKEN % (len(images) - 1)

    raw = dumps(build(placeholder))
    if not images:
        return raw
    pieces, rest = [], raw
    for k, data in enumerate(images):
        marker = dumps(_TOKEN % k)[1:-1]
        head, found, rest = rest.partition(marker)
        if not found:  # cannot happen unless a text holds the marker itself; build it the plain way
            return dumps(build(lambda d: encode(d).decode()))
        pieces += (head, encode(data))
    pieces.append(rest)
    return b"".join(pieces)


def retry_after(headers) -> float | None:
    """Seconds from a response's Retry-After header (None when it has none)."""
    return retry_after_seconds(headers.get("retry-after"))


class LeanClient:
    """An aiohttp session for one event loop, posting pre-serialized JSON to one base URL.

    Args:
        base_url: Joined with each path as is (``http://host/v1`` + ``/chat/completions``).
        headers: Sent with every request (auth, content type).
        timeout: Seconds a whole request may take.
        connections: Size of the connection pool (at least the requests in flight).
        errors: Turns a failed answer's ``(status, body, retry_after)`` into the exception to raise.
    """

    def __init__(self, base_url: str, headers: dict[str, str], timeout: float, connections: int,
                 errors: Callable = status_error):
        self.errors = errors
        self.base_url = base_url.rstrip("/")
        self.host = yarl.URL(self.base_url).host
        self.headers = {"Accept": "application/json", "Content-Type": "application/json",
                        "User-Agent": f"dfk8s/{__version__}", **headers}
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        connector = aiohttp.TCPConnector(limit=max(100, connections), ttl_dns_cache=300)
        self.session = aiohttp.ClientSession(connector=connector, timeout=self.timeout, headers=self.headers)

    async def post(self, path: str, data: bytes, *, params: dict | None = None) -> object:
        """POST ``data``; return the parsed JSON answer of a 2xx.

        Raises:
            RetryableError: 429, 5xx, a timeout, a refused or dropped connection, an answer that is not JSON.
            RowFailure: Another 4xx (systematic for 401/403/404) or an unresolvable host.
        """
        try:
            async with self.session.post(self.base_url + path, data=data, params=params) as response:
                raw = await response.read()
                status, headers = response.status, response.headers
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise transport_error(exc, self.host) from None
        if status >= 300:
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                body = raw.decode("utf-8", "replace")
            raise self.errors(status, body, retry_after(headers))
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise RetryableError("MalformedResponse", "unparseable response: JSONDecodeError") from None

    async def close(self) -> None:
        """Close the session (inside the loop that used it)."""
        await self.session.close()
