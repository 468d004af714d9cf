"""The OpenAPI document: every status each route can answer, our error body instead of FastAPI's
422, event-stream responses, and the bearer scheme when the deployment has API keys.

Routes declare their possible errors with :func:`errors`; :func:`install_openapi` then drops the
422 FastAPI adds to every route with a body (this server answers bad input with 400), adds the
statuses every route shares (401 with keys, 500, 503) and the security requirements.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server.schemas import ErrorResponse

DESCRIPTIONS = {
    400: "Bad parameter: malformed JSON, a wrong type or value, or a value over a server limit "
         "(`param` names the field, `code` says why)",
    401: "Missing or invalid API key",
    403: "A tenant key on an operator route",
    404: "Unknown session or model (or one owned by another key)",
    413: "Body over max_body_bytes, or document over max_document_tokens",
    429: "Work queue full; retry after `Retry-After` seconds",
    500: "A bug (the body says so; the server log has the trace)",
    507: "The session store is over its disk budget; nothing was stored",
    503: "Model loading, server shutting down or session files unreadable now (`Retry-After` set); or the model "
         "failed to load (no `Retry-After`)",
}
RETRY_HEADERS = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}},
                 "x-refine-retry-safe": {"description": "`true`: nothing was applied; retrying is safe",
                                         "schema": {"type": "string"}}}


def event_stream(*events: str) -> dict[str, Any]:
    """A ``text/event-stream`` 200: each event's name (``message`` when it has none) and JSON data
    (a string; docs/http-api.md says what each event's data holds)."""
    return {"text/event-stream": {"schema": {
        "type": "object", "required": ["event", "data"],
        "properties": {"event": {"type": "string", "enum": list(events)}, "data": {"type": "string"},
                       "id": {"type": "string"}, "retry": {"type": "integer"}}}}}
OPERATOR_PATHS = frozenset({"/metrics"})


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for the given error statuses, each with the error body."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorResponse, "description": DESCRIPTIONS[status]}
        if status in (429, 503):
            entry["headers"] = RETRY_HEADERS
        out[status] = entry
    return out


def _error_ref() -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


def build_openapi(app: FastAPI, api_keys: bool, operator_key: bool, open_paths: frozenset[str]) -> dict[str, Any]:
    """The spec of this deployment: security (and 401) only where the server checks keys."""
    spec = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    components = spec.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    if api_keys or operator_key:
        components["securitySchemes"] = {
            "apiKey": {"type": "http", "scheme": "bearer", "description": "one of the server's API keys"},
            "operatorKey": {"type": "http", "scheme": "bearer", "description": "the operator key (metrics_key)"},
        }
    for path, operations in spec.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            shared = [500] if path in OPERATOR_PATHS else [500, 503]
            if path in OPERATOR_PATHS:
                if api_keys or operator_key:
                    shared.append(401)
                    operation["security"] = [{"operatorKey": []}]
                else:
                    responses.pop("403", None)
            elif api_keys and path not in open_paths:
                shared.append(401)
                operation["security"] = [{"apiKey": []}]
            for status in shared:
                entry: dict[str, Any] = {"description": DESCRIPTIONS[status], "content": _error_ref()}
                if status == 503:
                    entry["headers"] = RETRY_HEADERS
                responses.setdefault(str(status), entry)
    return spec


def install_openapi(app: FastAPI, api_keys: bool, operator_key: bool, open_paths: frozenset[str]) -> None:
    """Replace ``app.openapi`` with :func:`build_openapi` (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, api_keys, operator_key, open_paths)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
