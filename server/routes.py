"""Routes: validate a typed request, call the engine, shape the response. Nothing else.

Errors are raised as domain exceptions and mapped to HTTP in ``server.errors``. Model work only
ever runs on the engine's worker; routes await its futures. Tokenising a request (which checks the
token limits) runs in the thread pool, never on the event loop.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from refine_tta.engine import Engine, InvalidSettings, NotFound, Unavailable, is_session_id
from refine_tta.model.generation import GenerationResult, SamplingConfig
from refine_tta.refine.config import RefineConfig
from server.errors import describe
from server.metrics import CONTENT_TYPE
from server.runtime import Runtime
from server.schemas import (
    AdaptRequest,
    AdaptResponse,
    Completion,
    CompletionChoice,
    CompletionRequest,
    CompletionUsage,
    DeleteResponse,
    GenerateRequest,
    GenerateResponse,
    Health,
    ModelCard,
    ModelList,
    SessionInfo,
    SessionList,
    TokenEvent,
)
from server.streaming import EventBridge, sse, wait_for_job

router = APIRouter()


# ------------------------------------------------------------------------------------ dependencies
def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def get_engine(runtime: Runtime = Depends(get_runtime)) -> Engine:
    """The running engine; 503 while the model loads (or if it failed to)."""
    if runtime.engine is None:
        raise Unavailable(runtime.status_message(), retry_after=runtime.retry_after_loading)
    return runtime.engine


def get_owner(request: Request) -> str | None:
    """Owner of the caller's sessions (set by the auth middleware; None without API keys)."""
    return request.scope.get("state", {}).get("owner")


def refine_config(runtime: Runtime, engine: Engine, given: dict[str, Any]) -> RefineConfig:
    try:
        return RefineConfig.from_dict({**runtime.settings.adapt_defaults(engine.default_preset), **given})
    except ValueError as exc:
        raise InvalidSettings(f"invalid settings: {exc}") from None


def sampling_config(engine: Engine, max_tokens: int | None, default_max_tokens: int, temperature: float,
                    top_p: float, seed: int, stop: list[str]) -> SamplingConfig:
    """The request's sampling; ``max_tokens`` None takes the default, capped by the server's limit."""
    if max_tokens is None:
        max_tokens = min(default_max_tokens, engine.limits.max_new_tokens)
    try:
        return SamplingConfig(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                              stop=tuple(stop))
    except ValueError as exc:
        raise InvalidSettings(str(exc)) from None


# ------------------------------------------------------------------------------------------ health
@router.api_route("/health", methods=["GET", "HEAD"], response_model=Health)
def health(runtime: Runtime = Depends(get_runtime)) -> Health:
    engine = get_engine(runtime)
    loaded = engine.loaded
    return Health(status="ok", model=loaded.name, device=str(loaded.device), backend=loaded.backend.name)


@router.get("/metrics", include_in_schema=False)
def metrics(runtime: Runtime = Depends(get_runtime)) -> Response:
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE)


# ------------------------------------------------------------------------------------------- adapt
@router.post("/v1/adapt", response_model=AdaptResponse)
async def adapt(body: AdaptRequest, request: Request, runtime: Runtime = Depends(get_runtime),
                engine: Engine = Depends(get_engine), owner: str | None = Depends(get_owner)) -> Any:
    config = refine_config(runtime, engine, body.settings.given())
    if not body.stream:
        handle = await run_in_threadpool(engine.submit_adapt, body.document, config, owner,
                                         base_session=body.base_session)
        return AdaptResponse.of(await wait_for_job(handle, request))
    bridge = EventBridge()
    handle = await run_in_threadpool(engine.submit_adapt, body.document, config, owner,
                                     bridge.callback(lambda step: step), base_session=body.base_session)
    bridge.attach(handle)

    async def events() -> AsyncIterator[dict]:
        async for step in bridge.items():
            yield {"event": "progress", "data": json.dumps(step)}
        error = handle.future.exception()
        if error is not None:
            yield {"event": "error", "data": describe(error).json()}
        else:
            yield {"event": "done", "data": AdaptResponse.of(handle.future.result()).model_dump_json()}

    return sse(events(), handle)


# ---------------------------------------------------------------------------------------- generate
@router.post("/v1/generate", response_model=GenerateResponse)
async def generate(body: GenerateRequest, request: Request, engine: Engine = Depends(get_engine),
                   owner: str | None = Depends(get_owner)) -> Any:
    sampling = sampling_config(engine, body.max_tokens, 64, body.temperature, body.top_p, body.seed, body.stops)
    if not body.stream:
        handle = await run_in_threadpool(engine.submit_generate, body.session_id, body.prompt, sampling, owner)
        return GenerateResponse.of(await wait_for_job(handle, request), body.session_id)
    bridge = EventBridge()
    handle = await run_in_threadpool(engine.submit_generate, body.session_id, body.prompt, sampling, owner,
                                     bridge.callback(lambda piece, token: TokenEvent(text=piece, token=token)))
    bridge.attach(handle)

    async def events() -> AsyncIterator[dict]:
        async for token in bridge.items():
            yield {"event": "token", "data": token.model_dump_json()}
        error = handle.future.exception()
        if error is not None:
            yield {"event": "error", "data": describe(error).json()}
        else:
            yield {"event": "done",
                   "data": GenerateResponse.of(handle.future.result(), body.session_id).model_dump_json()}

    return sse(events(), handle)


# ---------------------------------------------------------------------------------------- sessions
@router.get("/v1/sessions", response_model=SessionList)
def list_sessions(engine: Engine = Depends(get_engine), owner: str | None = Depends(get_owner)) -> SessionList:
    return SessionList(sessions=[SessionInfo.of(s) for s in engine.sessions.list(owner)])


@router.get("/v1/sessions/{session_id}", response_model=SessionInfo)
def get_session(session_id: str, engine: Engine = Depends(get_engine),
                owner: str | None = Depends(get_owner)) -> SessionInfo:
    return SessionInfo.of(engine.sessions.info(session_id, owner))


@router.delete("/v1/sessions/{session_id}", response_model=DeleteResponse)
def delete_session(session_id: str, engine: Engine = Depends(get_engine),
                   owner: str | None = Depends(get_owner)) -> DeleteResponse:
    engine.sessions.delete(session_id, owner)
    return DeleteResponse(session_id=session_id, deleted=True)


# ------------------------------------------------------------------------------- OpenAI-compatible
_OPENAI_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


@router.get("/v1/models", response_model=ModelList)
def list_models(runtime: Runtime = Depends(get_runtime), engine: Engine = Depends(get_engine),
                owner: str | None = Depends(get_owner)) -> ModelList:
    base = ModelCard(id=engine.model_name, created=int(runtime.started_at), owned_by="refine-tta")
    sessions = [ModelCard(id=s.id, created=int(s.created), owned_by="refine-tta-session")
                for s in engine.sessions.list(owner)]
    return ModelList(data=[base, *sessions])


@router.post("/v1/completions", response_model=Completion)
async def completions(body: CompletionRequest, request: Request, engine: Engine = Depends(get_engine),
                      owner: str | None = Depends(get_owner)) -> Any:
    session_id = None if body.model == engine.model_name else body.model
    if session_id is not None and not is_session_id(session_id):
        raise NotFound(f"model {body.model!r} not found: use a session id or the base model {engine.model_name!r}")
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    sampling = sampling_config(engine, body.max_tokens, 16, body.temperature, body.top_p, seed, body.stops)
    completion_id, created = "cmpl-" + uuid.uuid4().hex, int(time.time())

    def chunk(text: str, finish: str | None, usage: CompletionUsage | None = None, choices: bool = True) -> str:
        return Completion(id=completion_id, created=created, model=body.model, usage=usage,
                          choices=[CompletionChoice(text=text, finish_reason=finish)] if choices else []
                          ).model_dump_json(exclude_none=usage is None)

    def usage(result: GenerationResult) -> CompletionUsage:
        return CompletionUsage(prompt_tokens=result.prompt_tokens, completion_tokens=len(result.tokens),
                               total_tokens=result.prompt_tokens + len(result.tokens))

    if not body.stream:
        handle = await run_in_threadpool(engine.submit_generate, session_id, body.prompt_text, sampling, owner)
        result: GenerationResult = await wait_for_job(handle, request)
        choice = CompletionChoice(text=result.text, finish_reason=_OPENAI_FINISH[result.finish_reason])
        return Completion(id=completion_id, created=created, model=body.model, usage=usage(result), choices=[choice])
    bridge = EventBridge()
    handle = await run_in_threadpool(engine.submit_generate, session_id, body.prompt_text, sampling, owner,
                                     bridge.callback(lambda piece, token: piece))
    bridge.attach(handle)

    async def events() -> AsyncIterator[dict]:
        async for piece in bridge.items():
            yield {"data": chunk(piece, None)}
        error = handle.future.exception()
        if error is not None:
            yield {"data": describe(error).json()}
            return
        result = handle.future.result()
        yield {"data": chunk("", _OPENAI_FINISH[result.finish_reason])}
        if body.include_usage:
            yield {"data": chunk("", None, usage(result), choices=False)}
        yield {"data": "[DONE]"}

    return sse(events(), handle)
