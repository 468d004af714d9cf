"""The one place where errors become HTTP: status, body and headers (docs/http-api.md, "Errors").

Body: ``{"error": {"type", "message", "param", "code"}}`` (``param``: the request field at fault,
dotted, or null; ``code``: a machine-readable reason, or null). ``describe(exc)`` maps any
exception to an :class:`ErrorInfo`; the exception handlers, the middleware (401, 403, 413) and the
event streams (``event: error``) all go through it, so a problem looks the same whichever way it
reaches the client. Bad or over-limit parameters are 400 (what OpenAI clients map to
``BadRequestError``); 413 is kept for a body or a document too large to take.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.routing import Match

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
    """Missing or wrong API key; ``code``: ``missing_api_key``, ``invalid_api_key``."""

    def __init__(self, message: str, code: str = "invalid_api_key"):
        self.code = code
        super().__init__(message)


class PermissionDenied(Exception):
    """A valid key that may not use this route (a tenant key on the operator's ``/metrics``)."""


class BadParameter(Exception):
    """A request field the server will not honour (e.g. an OpenAI option it does not implement)."""

    def __init__(self, message: str, param: str | None, code: str = "invalid_value"):
        self.param, self.code = param, code
        super().__init__(message)


def bad_sampling(exc: ValueError) -> BadParameter:
    """A 400 for a sampling value the library refused, naming the parameter its message is about."""
    param = next((p for p in ("temperature", "top_p", "seed", "stop") if p in str(exc)), None)
    return BadParameter(str(exc), param)


class BodyTooLarge(Exception):
    def __init__(self, limit: int, size: int | None = None):
        self.limit, self.size = limit, size
        got = f"{size} bytes" if size is not None else f"more than {limit} bytes"
        super().__init__(f"request body is {got}, over the limit max_body_bytes={limit}")


class MalformedJSON(StarletteHTTPException):
    """The body is not JSON we accept (bad syntax, NaN/Infinity, nesting too deep, not UTF-8).
    An HTTPException so that FastAPI's body reader lets it through unchanged."""

    def __init__(self, message: str):
        super().__init__(400, message)


# Which request field each engine limit is about, and the status for going over it: 413 only for
# a document too large to take; anything a client chose (max_tokens, steps, ...) is a 400.
LIMIT_PARAMS: dict[str, tuple[str, int]] = {
    "max_document_tokens": ("document", 413),
    "max_prompt_tokens": ("prompt", 400),
    "max_new_tokens": ("max_tokens", 400),
    "max_steps": ("settings.steps", 400),
    "max_rollout_tokens": ("settings", 400),
    "max_lora_rank": ("settings.lora_rank", 400),
}


@dataclass(frozen=True)
class ErrorInfo:
    status: int
    type: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)
    param: str | None = None
    code: str | None = None

    def body(self) -> dict:
        return {"error": {"type": self.type, "message": self.message, "param": self.param, "code": self.code}}

    def json(self) -> str:
        return json.dumps(self.body())

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _retry(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, int(round(seconds)))), RETRY_SAFE_HEADER: "true"}


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _field(loc: tuple) -> str:
    """A dotted field path from a pydantic error location, without union-member tags
    (``("body", "stop", "list[constrained-str]", 0)`` -> ``stop.0``)."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")
             and (isinstance(p, int) or (str(p).isidentifier() and str(p) not in _TYPE_TAGS))]
    return ".".join(parts) or "body"


_VALIDATION_CODES = {"missing": "missing", "extra_forbidden": "unknown_field", "model_attributes_type": "invalid_type",
                     "model_type": "invalid_type", "json_invalid": "invalid_json"}


def _validation_message(exc: RequestValidationError) -> ErrorInfo:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return ErrorInfo(400, "invalid_request", f"malformed JSON body{': ' + str(detail) if detail else ''}",
                         code="invalid_json")
    parts = []
    for e in errors[:5]:
        where = _field(tuple(e.get("loc", ())))
        msg = e.get("msg", "invalid")
        if e.get("type") == "missing":
            msg = "field required"
        elif e.get("type") == "extra_forbidden":
            msg = "unknown field"
        elif e.get("type") in ("model_attributes_type", "model_type") and where == "body":
            msg = "the body must be a JSON object"
        parts.append(f"{where}: {msg}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    first = errors[0] if errors else {}
    param = _field(tuple(first.get("loc", ())))
    code = _VALIDATION_CODES.get(first.get("type", ""), "invalid_type" if str(first.get("type", "")).endswith(
        "_type") else "invalid_value")
    return ErrorInfo(400, "invalid_request", "; ".join(parts) + more, param=None if param == "body" else param,
                     code=code)


def describe(exc: BaseException) -> ErrorInfo:
    """Status, type, message and headers for any exception (unknown ones are 500s and logged)."""
    if isinstance(exc, NotFound):
        return ErrorInfo(404, "not_found", str(exc), code="not_found")
    if isinstance(exc, LimitExceeded):
        param, status = LIMIT_PARAMS.get(exc.limit, (None, 400))
        return ErrorInfo(status, "limit_exceeded" if status == 413 else "invalid_request", str(exc), param=param,
                         code="limit_exceeded")
    if isinstance(exc, BodyTooLarge):
        return ErrorInfo(413, "limit_exceeded", str(exc), code="body_too_large")
    if isinstance(exc, BadParameter):
        return ErrorInfo(400, "invalid_request", str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, InvalidSettings):
        return ErrorInfo(400, "invalid_request", str(exc), code="invalid_value")
    if isinstance(exc, MalformedJSON):
        return ErrorInfo(400, "invalid_request", str(exc.detail), code="invalid_json")
    if isinstance(exc, QueueFull):
        return ErrorInfo(429, "rate_limited", str(exc), _retry(exc.retry_after), code="queue_full")
    if isinstance(exc, Unavailable):
        return ErrorInfo(503, "unavailable", str(exc), {} if exc.retry_after is None else _retry(exc.retry_after),
                         code="unavailable")
    if isinstance(exc, StorageFull):
        return ErrorInfo(507, "storage_full", str(exc), code="storage_full")
    if isinstance(exc, Cancelled):
        return ErrorInfo(499, "cancelled", str(exc), code="cancelled")
    if isinstance(exc, AuthenticationFailed):
        return ErrorInfo(401, "authentication_error", str(exc), {"WWW-Authenticate": "Bearer"}, code=exc.code)
    if isinstance(exc, PermissionDenied):
        return ErrorInfo(403, "permission_denied", str(exc), code="operator_only")
    if isinstance(exc, RequestValidationError):
        return _validation_message(exc)
    if isinstance(exc, StarletteHTTPException):
        kind = {404: "not_found", 401: "authentication_error", 413: "limit_exceeded"}.get(
            exc.status_code, "invalid_request" if exc.status_code < 500 else "internal_error")
        return ErrorInfo(exc.status_code, kind, str(exc.detail), dict(exc.headers or {}))
    log.error("internal error", exc_info=(type(exc), exc, exc.__traceback__))
    return ErrorInfo(500, "internal_error", f"internal error ({type(exc).__name__}); see the server log",
                     code="internal_error")


def leaf_routes(routes: list) -> list:
    """Routes with their included routers flattened (FastAPI keeps an included router as one entry)."""
    out = []
    for route in routes:
        included = getattr(route, "original_router", None)
        out.extend(leaf_routes(included.routes) if included is not None else [route])
    return out


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at the request's path (for a 405's ``Allow``)."""
    methods: set[str] = set()
    for route in leaf_routes(request.app.router.routes):
        match, _ = route.matches({**request.scope, "method": "GET", "type": "http"})
        if match != Match.NONE and getattr(route, "methods", None):
            methods |= set(route.methods)
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception reaching FastAPI through :func:`describe`."""

    async def handle(request: Request, exc: Exception) -> Response:
        info = describe(exc)
        if isinstance(exc, StarletteHTTPException) and exc.status_code == 404 and exc.detail == "Not Found":
            info = ErrorInfo(404, "not_found", f"no route {request.method} {request.url.path}", code="no_route")
        elif isinstance(exc, StarletteHTTPException) and exc.status_code == 405:
            allow = allowed_methods(request)
            info = ErrorInfo(405, "invalid_request", f"method {request.method} not allowed on {request.url.path}; "
                             f"allowed: {', '.join(allow)}", {"Allow": ", ".join(allow)}, code="method_not_allowed")
        return info.response()

    for cls in (NotFound, LimitExceeded, InvalidSettings, QueueFull, Unavailable, StorageFull, Cancelled,
                AuthenticationFailed, PermissionDenied, BadParameter, BodyTooLarge, MalformedJSON,
                RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(cls, handle)
