"""Routes: validate a typed request, hand it to the :class:`~server.serving.Serving` object, return.

Errors are raised as domain exceptions and mapped to HTTP in ``server.errors``. Model work only
ever runs on the engine's worker; the serving object awaits its futures and tokenises requests
(which checks the token limits) in the thread pool, never on the event loop.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from server.metrics import CONTENT_TYPE
from server.runtime import Runtime
from server.schemas import (
    AdaptRequest,
    AdaptResponse,
    Completion,
    CompletionRequest,
    DeleteResponse,
    GenerateRequest,
    GenerateResponse,
    Health,
    ModelList,
    SessionInfo,
    SessionList,
)
from server.serving import Serving

router = APIRouter()


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
@router.get("/health", response_model=Health)
@router.head("/health", response_model=Health, include_in_schema=False)  # one operation id in the schema
def health(serving: Serving = Depends(get_serving)) -> Health:
    return serving.health()


@router.get("/metrics", include_in_schema=False)
def metrics(runtime: Runtime = Depends(get_runtime)) -> Response:
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE)


# ------------------------------------------------------------------------------- adapt and generate
@router.post("/v1/adapt", response_model=AdaptResponse)
async def adapt(body: AdaptRequest, request: Request, serving: Serving = Depends(get_serving),
                owner: str | None = Depends(get_owner)) -> Any:
    return await serving.adapt(body, request, owner)


@router.post("/v1/generate", response_model=GenerateResponse)
async def generate(body: GenerateRequest, request: Request, serving: Serving = Depends(get_serving),
                   owner: str | None = Depends(get_owner)) -> Any:
    return await serving.generate(body, request, owner)


# ---------------------------------------------------------------------------------------- sessions
@router.get("/v1/sessions", response_model=SessionList)
def list_sessions(serving: Serving = Depends(get_serving), owner: str | None = Depends(get_owner)) -> SessionList:
    return serving.sessions(owner)


@router.get("/v1/sessions/{session_id}", response_model=SessionInfo)
def get_session(session_id: str, serving: Serving = Depends(get_serving),
                owner: str | None = Depends(get_owner)) -> SessionInfo:
    return serving.session(session_id, owner)


@router.delete("/v1/sessions/{session_id}", response_model=DeleteResponse)
def delete_session(session_id: str, serving: Serving = Depends(get_serving),
                   owner: str | None = Depends(get_owner)) -> DeleteResponse:
    return serving.delete(session_id, owner)


# ------------------------------------------------------------------------------- OpenAI-compatible
@router.get("/v1/models", response_model=ModelList)
def list_models(serving: Serving = Depends(get_serving), owner: str | None = Depends(get_owner)) -> ModelList:
    return serving.models(owner)


@router.post("/v1/completions", response_model=Completion)
async def completions(body: CompletionRequest, request: Request, serving: Serving = Depends(get_serving),
                      owner: str | None = Depends(get_owner)) -> Any:
    return await serving.complete(body, request, owner)
