"""What OpenAI-compatible servings share: the client, and mapping SDK errors to retry decisions.

``openai`` is imported only where the SDK is used: importing it costs ~1 s of CPU per worker process,
which the lean request path (``--client fast``) never needs.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from urllib.parse import urlsplit

from dfk8s.errors import SpecError, retry_after_seconds
from dfk8s.servings import OPENAI_KEY_ENV, api_key_from_env
from dfk8s.servings.api import ApiOptions, RetryableError
from dfk8s.servings.http_errors import status_error, transport_error


def normalise_base_url(url: str | None) -> str | None:
    """Turn what users paste into the SDK's base URL, never producing ``/v1/v1``.

    ``http://host`` gets ``/v1``; ``http://host/v1/`` and full endpoint URLs such as DataFlow-MM's
    ``http://host/v1/chat/completions`` are cut back to ``http://host/v1``; any other path is kept.
    """
    if not url:
        return None
    url = url.rstrip("/")
    for suffix in ("/chat/completions", "/images/generations", "/images/edits"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    return url if urlsplit(url).path.strip("/") else url + "/v1"


def make_client(options: ApiOptions):
    """An async client with the SDK's own retries off: ours count attempts and honour Retry-After.

    It uses the SDK's aiohttp transport where available: at hundreds of requests in flight it costs
    about 40% less CPU per request than the default httpx transport (bench/caption_api.py).

    Raises:
        SpecError: The openai SDK is not installed (the api extra).
    """
    try:
        import openai
    except ImportError:
        raise SpecError("--client sdk needs the 'api' extra: pip install 'dfk8s[api]' (openai is missing); "
                        "the default --client fast needs nothing more") from None
    try:
        http_client = openai.DefaultAioHttpClient(
            limits=_limits(options.max_concurrency), timeout=options.timeout)
    except (RuntimeError, AttributeError, TypeError):  # SDK without the aiohttp extra
        http_client = None
    return openai.AsyncOpenAI(api_key=api_key_from_env(OPENAI_KEY_ENV),
                              base_url=normalise_base_url(options.api_url), timeout=options.timeout,
                              max_retries=0, http_client=http_client)


def _limits(concurrency: int):
    """Connection pool sized to the requests in flight, so no request waits for a connection."""
    import importlib

    import openai

    httpx_module = importlib.import_module(type(openai.DEFAULT_CONNECTION_LIMITS).__module__.split(".")[0])
    return httpx_module.Limits(max_connections=max(100, concurrency * 2),
                               max_keepalive_connections=max(20, concurrency))


def _retry_after(exc) -> float | None:
    return retry_after_seconds(exc.response.headers.get("retry-after")) if exc.response is not None else None


@contextmanager
def openai_errors(host: str | None = None):
    """Translate the SDK's exceptions as the lean path does (:mod:`dfk8s.servings.http_errors`).

    429/5xx/timeouts/garbage retry; 401/403/404 and an unresolvable host are systematic (the breaker
    trips); other 4xx fail the row with the server's message.
    """
    import openai

    try:
        yield
    except openai.APIConnectionError as exc:
        # APITimeoutError included: the SDK's aiohttp transport reports an unresolvable host as a
        # ConnectTimeout; the exception chain still holds the DNS error, which transport_error names.
        raise transport_error(exc, host) from None
    except (openai.APIResponseValidationError, json.JSONDecodeError) as exc:
        raise RetryableError("MalformedResponse", f"unparseable response: {type(exc).__name__}") from None
    except openai.APIStatusError as exc:
        body = exc.body if exc.body is not None else (exc.response.text if exc.response is not None else "")
        raise status_error(exc.status_code, body, _retry_after(exc)) from None
