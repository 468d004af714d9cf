"""Logic shared by :class:`RefineClient` and :class:`AsyncRefineClient`, free of I/O.

Configuration from arguments and environment, request building, response validation and the
mapping of HTTP errors and transport failures to this package's exceptions. The clients only add
the (sync or async) send loop around these functions; the retry decisions live in ``_retry``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import pydantic

from ._exceptions import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    RateLimitError,
    RequestTooLargeError,
    ServerError,
    ServiceUnavailableError,
    UnprocessableEntityError,
)
from ._version import __version__

__all__ = [
    "ENV_BASE_URL",
    "ENV_API_KEY",
    "ENV_TIMEOUT",
    "DEFAULT_BASE_URL",
    "DEFAULT_TIMEOUT",
    "ClientConfig",
    "RequestSpec",
    "resolve_config",
    "build_request",
    "adapt_spec",
    "generate_spec",
    "session_path",
    "validate_model",
    "parse_model",
    "decode_json",
    "status_error",
    "error_from_response",
    "error_from_event",
    "connection_error",
]

ENV_BASE_URL = "REFINE_TTA_BASE_URL"
ENV_API_KEY = "REFINE_TTA_API_KEY"
ENV_TIMEOUT = "REFINE_TTA_TIMEOUT"
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 600.0  # seconds; an adaptation can take minutes
CONNECT_TIMEOUT = 10.0  # seconds; failing to connect should not take the read timeout

M = TypeVar("M", bound=pydantic.BaseModel)


# --------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class ClientConfig:
    """Resolved client settings (arguments first, then environment, then defaults)."""

    base_url: str
    api_key: str | None
    timeout: httpx.Timeout
    max_retries: int


def resolve_config(
    base_url: str | None,
    api_key: str | None,
    timeout: float | httpx.Timeout | None,
    max_retries: int,
    environ: Mapping[str, str] | None = None,
) -> ClientConfig:
    """Resolve the constructor arguments against ``REFINE_TTA_*`` environment variables.

    ``timeout`` in seconds applies to reads, writes and the pool; connecting gets at most
    :data:`CONNECT_TIMEOUT`. An :class:`httpx.Timeout` is used as given.
    """
    env = os.environ if environ is None else environ
    url = (base_url or env.get(ENV_BASE_URL) or DEFAULT_BASE_URL).rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must start with http:// or https://, got {url!r}")
    key = api_key if api_key is not None else (env.get(ENV_API_KEY) or None)
    if timeout is None:
        raw = env.get(ENV_TIMEOUT)
        if raw:
            try:
                timeout = float(raw)
            except ValueError:
                raise ValueError(f"{ENV_TIMEOUT} must be a number of seconds, got {raw!r}") from None
        else:
            timeout = DEFAULT_TIMEOUT
    if not isinstance(timeout, httpx.Timeout):
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        timeout = httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT, timeout))
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    return ClientConfig(base_url=url, api_key=key, timeout=timeout, max_retries=max_retries)


# --------------------------------------------------------------------------------------------
# requests


@dataclass(frozen=True)
class RequestSpec:
    """One API call, before it is turned into an :class:`httpx.Request` (once per attempt).

    ``idempotent`` decides whether a failure after the request may have reached the server can
    be retried (see ``_retry``); ``stream`` asks for ``text/event-stream``.
    """

    method: str
    path: str
    json: Mapping[str, Any] | None = None
    idempotent: bool = True
    stream: bool = False


def _headers(config: ClientConfig, *, stream: bool) -> dict[str, str]:
    headers = {
        "Accept": "text/event-stream" if stream else "application/json",
        "User-Agent": f"refine-tta-client/{__version__}",
    }
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    return headers


def build_request(
    http: httpx.Client | httpx.AsyncClient, config: ClientConfig, spec: RequestSpec
) -> httpx.Request:
    """The :class:`httpx.Request` for ``spec`` (no I/O; works for both kinds of client)."""
    return http.build_request(
        spec.method,
        config.base_url + spec.path,
        json=dict(spec.json) if spec.json is not None else None,
        headers=_headers(config, stream=spec.stream),
        timeout=config.timeout,
    )


def _without_none(values: Mapping[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not None}


def adapt_spec(
    document: str,
    settings: Mapping[str, Any],
    extra_settings: Mapping[str, Any] | None,
    *,
    stream: bool,
    base_session: str | None = None,
) -> RequestSpec:
    """``POST /v1/adapt``; settings left at None are omitted (the server's defaults apply).
    ``base_session``: continue from that session's adapted weights.

    Not idempotent: a retry could create a second session.
    """
    if not isinstance(document, str):
        raise TypeError(f"document must be str, got {type(document).__name__}")
    merged = {**_without_none(settings), **dict(extra_settings or {})}
    body: dict[str, Any] = {"document": document, "settings": merged, "stream": stream}
    if base_session is not None:
        body["base_session"] = base_session
    return RequestSpec(
        "POST",
        "/v1/adapt",
        json=body,
        idempotent=False,
        stream=stream,
    )


def generate_spec(
    session: str | None,
    prompt: str,
    *,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    seed: int | None,
    stop: str | Sequence[str] | None,
    stream: bool,
) -> RequestSpec:
    """``POST /v1/generate``; ``session=None`` uses the base model. Idempotent given a seed."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be str, got {type(prompt).__name__}")
    body = _without_none(
        {
            "session_id": session,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
            "stop": [stop] if isinstance(stop, str) else (list(stop) if stop is not None else None),
        }
    )
    body["stream"] = stream
    return RequestSpec("POST", "/v1/generate", json=body, idempotent=True, stream=stream)


def session_path(session_id: str) -> str:
    """``/v1/sessions/{id}`` with the id percent-encoded (it cannot escape the path)."""
    if not isinstance(session_id, str) or not session_id:
        raise ValueError("session_id must be a non-empty string")
    return "/v1/sessions/" + quote(session_id, safe="")


# --------------------------------------------------------------------------------------------
# responses


def validate_model(model: type[M], data: Any) -> M:
    """``model.model_validate(data)``, raising :class:`APIResponseValidationError` on mismatch."""
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise APIResponseValidationError(
            f"unexpected {model.__name__} from server: {exc}", body=data
        ) from exc


def parse_model(response: httpx.Response, model: type[M]) -> M:
    """Decode a successful, already read response body into ``model``."""
    try:
        data = response.json()
    except ValueError as exc:
        raise APIResponseValidationError(
            f"response of {response.request.method} {response.request.url.path} is not JSON",
            body=response.text,
        ) from exc
    return validate_model(model, data)


def decode_json(text: str) -> Any:
    """``json.loads`` raising :class:`APIResponseValidationError` (used for SSE data)."""
    try:
        return json.loads(text)
    except ValueError as exc:
        raise APIResponseValidationError(f"event data is not JSON: {text[:200]!r}", body=text) from exc


# --------------------------------------------------------------------------------------------
# errors

_STATUS_CLASSES: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    413: RequestTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}

# Status of each contract error type, for ``event: error`` inside a stream (which has no status).
_STATUS_OF_TYPE: dict[str, int] = {
    "invalid_request": 400,
    "authentication_error": 401,
    "permission_denied": 403,
    "not_found": 404,
    "limit_exceeded": 413,
    "rate_limited": 429,
    "cancelled": 499,
    "internal_error": 500,
    "unavailable": 503,
}


def _error_class(status_code: int) -> type[APIStatusError]:
    if status_code in _STATUS_CLASSES:
        return _STATUS_CLASSES[status_code]
    if status_code >= 500:
        return ServerError
    return APIStatusError


def _error_fields(body: Any) -> tuple[str | None, str | None]:
    """``(error.type, error.message)`` of a contract error body, or Nones if it is not one."""
    if isinstance(body, Mapping):
        error = body.get("error")
        if isinstance(error, Mapping):
            error_type = error.get("type")
            message = error.get("message")
            return (
                error_type if isinstance(error_type, str) else None,
                message if isinstance(message, str) else None,
            )
        detail = body.get("detail")  # a framework error that bypassed the server's handler
        if isinstance(detail, str):
            return None, detail
    return None, None


def status_error(status_code: int, body: Any, headers: httpx.Headers | None = None) -> APIStatusError:
    """The exception for an error ``status_code`` whose decoded body is ``body``."""
    error_type, message = _error_fields(body)
    if message is None:
        text = body if isinstance(body, str) else ("" if body is None else json.dumps(body))
        message = f"HTTP {status_code}" + (f": {text[:200]}" if text else "")
    return _error_class(status_code)(status_code, error_type, message, body, headers)


def error_from_response(response: httpx.Response) -> APIStatusError:
    """The exception for an error response whose body has been read."""
    body: Any
    try:
        body = response.json()
    except ValueError:
        body = response.text or None
    except httpx.ResponseNotRead:  # reading the body of a streamed response failed
        body = None
    return status_error(response.status_code, body, response.headers)


def error_from_event(data: Any, headers: httpx.Headers | None = None) -> APIStatusError:
    """The exception for the ``{"error": {...}}`` data of an ``event: error`` in a stream."""
    error_type, _ = _error_fields(data)
    status_code = _STATUS_OF_TYPE.get(error_type or "", 500)
    return status_error(status_code, data, headers)


def connection_error(exc: httpx.TransportError) -> APIConnectionError:
    """Map an httpx transport failure to :class:`APITimeoutError` / :class:`APIConnectionError`."""
    try:
        request: httpx.Request | None = exc.request
    except RuntimeError:  # httpx raises when the error was created without a request
        request = None
    where = f" ({request.method} {request.url})" if request is not None else ""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"request timed out{where}: {detail}", request=request)
    return APIConnectionError(f"connection error{where}: {detail}", request=request)
