"""Exceptions raised by the refine-tta client.

Hierarchy::

    RefineError
    ├── APIResponseValidationError     a 2xx body that is not what the contract promises
    ├── APIConnectionError             no HTTP response (refused, reset, DNS, stream cut)
    │   └── APITimeoutError            the request timed out
    └── APIStatusError                 the server answered 4xx/5xx (or sent an ``error`` event)
        ├── BadRequestError            400, 413, 422
        │   ├── RequestTooLargeError   413 (``limit_exceeded``)
        │   └── UnprocessableEntityError 422
        ├── AuthenticationError        401, 403
        ├── NotFoundError              404
        ├── RateLimitError             429 (``retry_after``)
        └── ServerError                5xx
            └── ServiceUnavailableError 503 (``retry_after``)

The message of an :class:`APIStatusError` is the server's ``error.message``.
"""

from __future__ import annotations

from typing import Any

import httpx

from ._retry import parse_retry_after

__all__ = [
    "RefineError",
    "APIResponseValidationError",
    "APIConnectionError",
    "APITimeoutError",
    "APIStatusError",
    "BadRequestError",
    "RequestTooLargeError",
    "UnprocessableEntityError",
    "AuthenticationError",
    "NotFoundError",
    "RateLimitError",
    "ServerError",
    "ServiceUnavailableError",
]


class RefineError(Exception):
    """Base class of every exception raised by this package."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class APIResponseValidationError(RefineError):
    """The server answered 2xx but the body is not JSON or does not match the contract."""

    def __init__(self, message: str, *, body: Any = None) -> None:
        super().__init__(message)
        self.body = body


class APIConnectionError(RefineError):
    """No (complete) response: the connection failed, was reset, or a stream was cut short."""

    def __init__(self, message: str = "connection error", *, request: httpx.Request | None = None) -> None:
        super().__init__(message)
        self.request = request


class APITimeoutError(APIConnectionError):
    """The request timed out (connect, write, read or pool timeout)."""

    def __init__(self, message: str = "request timed out", *, request: httpx.Request | None = None) -> None:
        super().__init__(message, request=request)


class APIStatusError(RefineError):
    """The server answered with an error status (or an ``event: error`` in a stream).

    Attributes:
        status_code: HTTP status (for a stream ``error`` event: the status of its ``type``).
        error_type: the contract's ``error.type`` (``invalid_request``, ``not_found``, ...), or None.
        message: the server's ``error.message``.
        body: the decoded JSON body (or the raw text when it was not JSON).
        headers: the response headers.
        request_id: the ``x-request-id`` header, when present.
    """

    def __init__(
        self,
        status_code: int,
        error_type: str | None,
        message: str,
        body: Any = None,
        headers: httpx.Headers | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_type = error_type
        self.body = body
        self.headers = headers if headers is not None else httpx.Headers()
        self.request_id: str | None = self.headers.get("x-request-id")

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status_code={self.status_code}, "
            f"error_type={self.error_type!r}, message={self.message!r})"
        )


class BadRequestError(APIStatusError):
    """400/413/422: the request is malformed, impossible or over a limit. Do not retry as is."""


class RequestTooLargeError(BadRequestError):
    """413 ``limit_exceeded``: body or document too large (the message names the limit). Parameters over a
    limit (``max_tokens``, prompt tokens, steps) are a 400 :class:`BadRequestError`."""


class UnprocessableEntityError(BadRequestError):
    """422: a field has the wrong type or failed validation (the message names the field)."""


class AuthenticationError(APIStatusError):
    """401/403: the API key is missing or wrong."""


class NotFoundError(APIStatusError):
    """404: unknown session (or one owned by another key)."""


class _RetryAfterMixin:
    headers: httpx.Headers

    @property
    def retry_after(self) -> float | None:
        """Seconds the server asked to wait (``Retry-After``), or None when absent or unparsable."""
        return parse_retry_after(self.headers)


class RateLimitError(_RetryAfterMixin, APIStatusError):
    """429 ``rate_limited``: the server's work queue is full; see :attr:`retry_after`."""


class ServerError(APIStatusError):
    """5xx: the server failed."""


class ServiceUnavailableError(_RetryAfterMixin, ServerError):
    """503 ``unavailable``: the model is still loading; see :attr:`retry_after`."""
