"""The one place where errors become HTTP: status, ``{"error": {"type", "message"}}`` body, headers.

``describe(exc)`` maps any exception to an :class:`ErrorInfo`; the exception handlers, the
middleware (401, 413) and the event streams (``event: error``) all go through it, so a problem
looks the same whichever way it reaches the client.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from refine_tta.engine import (
    Cancelled,
    InvalidSettings,
    LimitExceeded,
    NotFound,
    QueueFull,
    StorageFull,
    Unavailable,
)

log = logging.getLogger(__name__)

RETRY_SAFE_HEADER = "x-refine-retry-safe"


class AuthenticationFailed(Exception):
    """Missing or wrong API key."""


class BodyTooLarge(Exception):
    def __init__(self, limit: int, size: int | None = None):
        self.limit, self.size = limit, size
        got = f"{size} bytes" if size is not None else f"more than {limit} bytes"
        super().__init__(f"request body is {got}, over the limit max_body_bytes={limit}")


class MalformedJSON(Exception):
    """The body is not valid JSON."""


@dataclass(frozen=True)
class ErrorInfo:
    status: int
    type: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict:
        return {"error": {"type": self.type, "message": self.message}}

    def json(self) -> str:
        return json.dumps(self.body())

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _retry(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, int(round(seconds)))), RETRY_SAFE_HEADER: "true"}


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def _validation_message(exc: RequestValidationError) -> ErrorInfo:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return ErrorInfo(400, "invalid_request", f"malformed JSON body{': ' + str(detail) if detail else ''}")
    parts = []
    for e in errors[:5]:
        where = _field(tuple(e.get("loc", ())))
        msg = e.get("msg", "invalid")
        if e.get("type") == "missing":
            msg = "field required"
        elif e.get("type") == "extra_forbidden":
            msg = "unknown field"
        elif e.get("type") == "model_attributes_type" and where == "body":
            msg = "the body must be a JSON object"
        parts.append(f"{where}: {msg}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return ErrorInfo(422, "invalid_request", "; ".join(parts) + more)


def describe(exc: BaseException) -> ErrorInfo:
    """Status, type, message and headers for any exception (unknown ones are 500s and logged)."""
    if isinstance(exc, NotFound):
        return ErrorInfo(404, "not_found", str(exc))
    if isinstance(exc, (LimitExceeded, BodyTooLarge)):
        return ErrorInfo(413, "limit_exceeded", str(exc))
    if isinstance(exc, InvalidSettings):
        return ErrorInfo(400, "invalid_request", str(exc))
    if isinstance(exc, MalformedJSON):
        return ErrorInfo(400, "invalid_request", str(exc))
    if isinstance(exc, QueueFull):
        return ErrorInfo(429, "rate_limited", str(exc), _retry(exc.retry_after))
    if isinstance(exc, Unavailable):
        return ErrorInfo(503, "unavailable", str(exc), {} if exc.retry_after is None else _retry(exc.retry_after))
    if isinstance(exc, StorageFull):
        return ErrorInfo(507, "storage_full", str(exc))
    if isinstance(exc, Cancelled):
        return ErrorInfo(499, "cancelled", str(exc))
    if isinstance(exc, AuthenticationFailed):
        return ErrorInfo(401, "authentication_error", str(exc), {"WWW-Authenticate": "Bearer"})
    if isinstance(exc, RequestValidationError):
        return _validation_message(exc)
    if isinstance(exc, StarletteHTTPException):
        kind = {404: "not_found", 401: "authentication_error", 413: "limit_exceeded"}.get(
            exc.status_code, "invalid_request" if exc.status_code < 500 else "internal_error")
        return ErrorInfo(exc.status_code, kind, str(exc.detail), dict(exc.headers or {}))
    log.error("internal error", exc_info=(type(exc), exc, exc.__traceback__))
    return ErrorInfo(500, "internal_error", f"internal error ({type(exc).__name__}); see the server log")


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception reaching FastAPI through :func:`describe`."""

    async def handle(request: Request, exc: Exception) -> Response:
        info = describe(exc)
        if isinstance(exc, StarletteHTTPException) and exc.status_code == 404 and exc.detail == "Not Found":
            info = ErrorInfo(404, "not_found", f"no route {request.method} {request.url.path}")
        elif isinstance(exc, StarletteHTTPException) and exc.status_code == 405:
            info = ErrorInfo(405, "invalid_request", f"method {request.method} not allowed on {request.url.path}",
                             info.headers)
        return info.response()

    for cls in (NotFound, LimitExceeded, InvalidSettings, QueueFull, Unavailable, StorageFull, Cancelled,
                AuthenticationFailed, BodyTooLarge, MalformedJSON, RequestValidationError, StarletteHTTPException,
                Exception):
        app.add_exception_handler(cls, handle)
