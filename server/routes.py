"""Routes: validate a typed request, hand it to the :class:`~server.serving.Serving` object, return.

Errors are raised as domain exceptions and mapped to HTTP in ``server.errors``; each route lists
the statuses it can answer (``responses=``, :mod:`server.openapi`). Bodies are parsed by
``server.jsonbody`` (strict JSON: finite numbers, bounded nesting, UTF-8). Model work only ever
runs on the engine's worker; the serving object awaits its futures and tokenises requests (which
checks the token limits) in the thread pool, never on the event loop.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from server.jsonbody import StrictJSONRoute
from server.metrics import CONTENT_TYPE
from server.openapi import errors, event_stream
from server.runtime import Runtime
from server.schemas import (
    AdaptRequest,
    AdaptResponse,
    Completion,
    CompletionRequest,
    DeleteResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    GenerateRequest,
    GenerateResponse,
    Health,
    ModelList,
    SessionInfo,
    SessionList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from server.serving import Serving

router = APIRouter(route_class=StrictJSONRoute)


# ------------------------------------------------------------------------------------ dependencies
def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def get_serving(runtime: Runtime = Depends(get_runtime)) -> Serving:
    """The serving object of the running engine; 503 while the model loads (or if it failed to)."""
    if runtime.serving is None:
        raise runtime.unavailable()
    return runtime.serving


def get_owner(request: Request) -> str | None:
    """Owner of the caller's sessions (set by the auth middleware; None without API keys)."""
    return request.scope.get("state", {}).get("owner")


# ------------------------------------------------------------------------------------------ health
@router.get("/health", response_model=Health, responses=errors())
@router.head("/health", response_model=Health, include_in_schema=False)  # one operation id in the schema
def health(serving: Serving = Depends(get_serving)) -> Health:
    return serving.health()


@router.get("/metrics", response_class=Response, responses={
    200: {"content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}},
          "description": "Prometheus text format"}, **errors(403)})
def metrics(runtime: Runtime = Depends(get_runtime)) -> Response:
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE)


# ------------------------------------------------------------------------------- adapt and generate
@router.post("/v1/adapt", response_model=AdaptResponse,
             responses={200: {"content": event_stream("started", "progress", "done", "error")},
                        **errors(400, 404, 413, 429, 507)})
async def adapt(body: AdaptRequest, request: Request, serving: Serving = Depends(get_serving),
                owner: str | None = Depends(get_owner)) -> Any:
    return await serving.adapt(body, request, owner)


@router.post("/v1/generate", response_model=GenerateResponse,
             responses={200: {"content": event_stream("token", "done", "error")}, **errors(400, 404, 413, 429)})
async def generate(body: GenerateRequest, request: Request, serving: Serving = Depends(get_serving),
                   owner: str | None = Depends(get_owner)) -> Any:
    return await serving.generate(body, request, owner)


# ---------------------------------------------------------------------------------------- sessions
@router.get("/v1/sessions", response_model=SessionList, responses=errors())
def list_sessions(serving: Serving = Depends(get_serving), owner: str | None = Depends(get_owner)) -> SessionList:
    return serving.sessions(owner)


@router.get("/v1/sessions/{session_id}", response_model=SessionInfo, responses=errors(404))
def get_session(session_id: str, serving: Serving = Depends(get_serving),
                owner: str | None = Depends(get_owner)) -> SessionInfo:
    return serving.session(session_id, owner)


@router.delete("/v1/sessions/{session_id}", response_model=DeleteResponse, responses=errors(404))
def delete_session(session_id: str, serving: Serving = Depends(get_serving),
                   owner: str | None = Depends(get_owner)) -> DeleteResponse:
    return serving.delete(session_id, owner)


# ------------------------------------------------------------------------------- OpenAI-compatible
@router.get("/v1/models", response_model=ModelList, responses=errors())
def list_models(serving: Serving = Depends(get_serving), owner: str | None = Depends(get_owner)) -> ModelList:
    return serving.models(owner)


@router.post("/v1/completions", response_model=Completion,
             responses={200: {"content": event_stream("message")}, **errors(400, 404, 413, 429)})
async def completions(body: CompletionRequest, request: Request, serving: Serving = Depends(get_serving),
                      owner: str | None = Depends(get_owner)) -> Any:
    return await serving.complete(body, request, owner)


# ------------------------------------------------------------------------------- tokenize (vLLM)
@router.post("/tokenize", response_model=TokenizeResponse, responses=errors(400, 404))
async def tokenize(body: TokenizeRequest, serving: Serving = Depends(get_serving),
                   owner: str | None = Depends(get_owner)) -> TokenizeResponse:
    return await serving.tokenize(body, owner)


@router.get("/tokenizer_info", response_model=TokenizerInfo, responses=errors())
def tokenizer_info(serving: Serving = Depends(get_serving)) -> TokenizerInfo:
    return serving.tokenizer_info()


@router.post("/detokenize", response_model=DetokenizeResponse, responses=errors(400, 404))
async def detokenize(body: DetokenizeRequest, serving: Serving = Depends(get_serving),
                     owner: str | None = Depends(get_owner)) -> DetokenizeResponse:
    return await serving.detokenize(body, owner)
