"""HTTP answers and transport failures as retry decisions, shared by the SDK and the lean request paths.

Both paths of a serving (the vendor SDK and the aiohttp one) hand a failed answer's status and body, or
a transport exception, to these functions, so their error records are the same to the byte.
"""

from __future__ import annotations

import asyncio
import errno
import socket

from dfk8s.servings.api import RetryableError, RowFailure

#: How much of a server's message an error record keeps.
MESSAGE_CHARS = 500


def error_object(body) -> tuple[str, str | None]:
    """The server's message and error code from an error body (parsed JSON, or text).

    OpenAI-style bodies are ``{"error": {"message", "type", "code"}}`` (the SDK hands over the inner
    object); Gemini's are ``{"error": {"code", "message", "status"}}``; anything else is kept as text.
    """
    if isinstance(body, (bytes, bytearray)):
        body = body.decode("utf-8", "replace")
    err = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(err, dict):
        message = err.get("message")
        code = err.get("code") if isinstance(err.get("code"), str) else None
        code = code or err.get("status") or err.get("type")
        if not message:
            message = str(body)
        return _clip(str(message)), str(code) if code is not None else None
    return _clip(str(err or "")), None


def _clip(text: str) -> str:
    return " ".join(text.split())[:MESSAGE_CHARS]


def status_error(status: int, body, retry_after: float | None) -> Exception:
    """The exception for a non-2xx answer: RetryableError (429, 408/409, 5xx) or RowFailure.

    401/403 and 404 are marked systematic (a bad key, model or endpoint: the breaker trips at once).
    """
    message, code = error_object(body)
    details = {"status": status, "code": code}
    said = f": {message}" if message else ""
    if status == 429:
        return RetryableError("RateLimited", f"HTTP 429{said}", retry_after, details)
    if status in (408, 409) or status >= 500:
        return RetryableError("ServerError", f"HTTP {status}{said}", retry_after, details)
    if status in (401, 403):
        kind = "AuthenticationError" if status == 401 else "PermissionDenied"
        return RowFailure(kind, f"HTTP {status}{said}", details, systematic=True)
    gateway = _gateway_mistake(status, message, code)
    if gateway is not None:
        return RowFailure(gateway, f"HTTP {status}{said}", details, systematic=True)
    if status == 405:  # a gateway answers a path it does not serve this way (LiteLLM's root, say)
        return RowFailure("NotFound", f"HTTP 405 Method Not Allowed{said}", details, systematic=True)
    if status == 404:
        lowered = message.lower()
        model = code == "model_not_found" or ("model" in lowered and ("not" in lowered or "exist" in lowered))
        return RowFailure("ModelNotFound" if model else "NotFound", f"HTTP 404{said}", details,
                          systematic=True)
    if code == "content_policy_violation":
        return RowFailure("Refusal", message or "refused by the content policy")
    return RowFailure("BadRequest", f"HTTP {status}{said}", details)


def _gateway_mistake(status: int, message: str, code: str | None) -> str | None:
    """The mistake a gateway's own 400 names, as the provider would name it (None for any other answer).

    LiteLLM answers a key it does not know with 400 ``no_db_connection`` (without a database it checks
    only its master key), and a model it does not route with 400 ``Invalid model name passed in
    model=``. Both trip the breaker at once.
    """
    if status != 400:
        return None
    lowered = message.lower()
    if code == "no_db_connection" or "no connected db" in lowered:
        return "AuthenticationError"
    if "invalid model name" in lowered:
        return "ModelNotFound"
    return None


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def transport_error(exc: BaseException, host: str | None = None) -> Exception:
    """Name a failure to reach the server: DNSError, ConnectionRefused, Timeout or ConnectionError.

    An unresolvable host is not retried (it fails fast and trips the breaker); a temporary resolver
    failure, a refused connection, a timeout and a dropped connection are retried.
    """
    where = f" {host}" if host else ""
    for cause in _chain(exc):
        name = type(cause).__name__
        if isinstance(cause, socket.gaierror) or name == "ClientConnectorDNSError":
            code = getattr(cause, "errno", None) or getattr(getattr(cause, "os_error", None), "errno", None)
            text = f"cannot resolve host{where}: {getattr(cause, 'strerror', None) or cause}"
            if code == socket.EAI_AGAIN:
                return RetryableError("DNSError", _clip(text))
            return RowFailure("DNSError", _clip(text), systematic=True)
        if isinstance(cause, ConnectionRefusedError) or getattr(cause, "errno", None) == errno.ECONNREFUSED:
            by = where or " the server"
            return RetryableError("ConnectionRefused", _clip(f"connection refused by{by}"))
    for cause in _chain(exc):
        if isinstance(cause, (TimeoutError, asyncio.TimeoutError)) or "Timeout" in type(cause).__name__:
            return RetryableError("Timeout", "request timed out")
    return RetryableError("ConnectionError", _clip(f"{type(exc).__name__}: {exc}"))
