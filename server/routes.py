"""Routes: validate a typed request, call the engine, shape the response. Nothing else.

Errors are raised as domain exceptions and mapped to HTTP in ``server.errors``. Model work only
ever runs on the engine's worker; routes await its futures. Tokenising a request (which checks the
token limits) runs in the thread pool, never on the event loop.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from refine_tta.engine import Engine, GenerationResult, InvalidSettings, RefineConfig, SamplingConfig
from server import openai_compat
from server.errors import BadParameter, describe
from server.jsonbody import StrictJSONRoute
from server.metrics import CONTENT_TYPE
from server.openapi import errors, event_stream
from server.runtime import Runtime
from server.schemas import (
    AdaptRequest,
    AdaptResponse,
    Completion,
    CompletionChoice,
    CompletionRequest,
    CompletionUsage,
    DeleteResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    GenerateRequest,
    GenerateResponse,
    Health,
    ModelCard,
    ModelList,
    SessionInfo,
    SessionList,
    TokenEvent,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from server.streaming import EventBridge, sse, wait_for_job

router = APIRouter(route_class=StrictJSONRoute)


# ------------------------------------------------------------------------------------ dependencies
def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def get_engine(runtime: Runtime = Depends(get_runtime)) -> Engine:
    """The running engine; 503 while the model loads (or if it failed to)."""
    if runtime.engine is None:
        raise runtime.unavailable()
    return runtime.engine


def get_owner(request: Request) -> str | None:
    """Owner of the caller's sessions (set by the auth middleware; None without API keys)."""
    return request.scope.get("state", {}).get("owner")


def refine_config(runtime: Runtime, given: dict[str, Any]) -> RefineConfig:
    try:
        return RefineConfig.from_dict({**runtime.settings.adapt_defaults, **given})
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
        param = next((p for p in ("temperature", "top_p", "seed", "stop") if p in str(exc)), None)
        raise BadParameter(str(exc), param) from None


# ------------------------------------------------------------------------------------------ health
@router.get("/health", response_model=Health, responses=errors())
@router.head("/health", response_model=Health, include_in_schema=False)  # one operation id in the schema
def health(runtime: Runtime = Depends(get_runtime)) -> Health:
    engine = get_engine(runtime)
    loaded = engine.loaded
    return Health(status="ok", model=loaded.name, device=str(loaded.device), backend=loaded.backend.name)


@router.get("/metrics", response_class=Response, responses={
    200: {"content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}},
          "description": "Prometheus text format"}, **errors(403)})
def metrics(runtime: Runtime = Depends(get_runtime)) -> Response:
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE)


# ------------------------------------------------------------------------------------------- adapt
@router.post("/v1/adapt", response_model=AdaptResponse,
             responses={200: {"content": event_stream("started", "progress", "done", "error")},
                        **errors(400, 413, 429, 507)})
async def adapt(body: AdaptRequest, request: Request, runtime: Runtime = Depends(get_runtime),
                engine: Engine = Depends(get_engine), owner: str | None = Depends(get_owner)) -> Any:
    config = refine_config(runtime, body.settings.given())
    if not body.stream:
        handle = await run_in_threadpool(engine.submit_adapt, body.document, config, owner)
        return AdaptResponse.of(await wait_for_job(handle, request))
    bridge = EventBridge()
    handle = await run_in_threadpool(engine.submit_adapt, body.document, config, owner,
                                     bridge.callback(lambda event, data: (event, data)))
    bridge.attach(handle)

    async def events() -> AsyncIterator[dict]:
        async for event, data in bridge.items():  # "started" once, then "progress" per step
            yield {"event": event, "data": json.dumps(data)}
        error = handle.future.exception()
        if error is not None:
            yield {"event": "error", "data": describe(error).json()}
        else:
            yield {"event": "done", "data": AdaptResponse.of(handle.future.result()).model_dump_json()}

    return sse(events(), handle)


# ---------------------------------------------------------------------------------------- generate
@router.post("/v1/generate", response_model=GenerateResponse,
             responses={200: {"content": event_stream("token", "done", "error")}, **errors(400, 404, 413, 429)})
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
@router.get("/v1/sessions", response_model=SessionList, responses=errors())
def list_sessions(engine: Engine = Depends(get_engine), owner: str | None = Depends(get_owner)) -> SessionList:
    return SessionList(sessions=[SessionInfo.of(s) for s in engine.sessions.list(owner)])


@router.get("/v1/sessions/{session_id}", response_model=SessionInfo, responses=errors(404))
def get_session(session_id: str, engine: Engine = Depends(get_engine),
                owner: str | None = Depends(get_owner)) -> SessionInfo:
    return SessionInfo.of(engine.sessions.info(session_id, owner))


@router.delete("/v1/sessions/{session_id}", response_model=DeleteResponse, responses=errors(404))
def delete_session(session_id: str, engine: Engine = Depends(get_engine),
                   owner: str | None = Depends(get_owner)) -> DeleteResponse:
    engine.sessions.delete(session_id, owner)
    return DeleteResponse(session_id=session_id, deleted=True)


# ------------------------------------------------------------------------------- OpenAI-compatible
@router.get("/v1/models", response_model=ModelList, responses=errors())
def list_models(runtime: Runtime = Depends(get_runtime), engine: Engine = Depends(get_engine),
                owner: str | None = Depends(get_owner)) -> ModelList:
    base = ModelCard(id=engine.model_name, created=int(runtime.started_at), owned_by="refine-tta")
    sessions = [ModelCard(id=s.id, created=int(s.created), owned_by="refine-tta-session")
                for s in engine.sessions.list(owner)]
    return ModelList(data=[base, *sessions])


def _usage(prompts: list[openai_compat.Prompt], results: list[GenerationResult | None]) -> CompletionUsage:
    prompt_tokens = sum(len(p.ids) for p in prompts)
    completion_tokens = sum(len(r.tokens) for r in results if r is not None)
    return CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                           total_tokens=prompt_tokens + completion_tokens)


@router.post("/v1/completions", response_model=Completion,
             responses={200: {"content": event_stream("message")}, **errors(400, 404, 413, 429)})
async def completions(body: CompletionRequest, request: Request, engine: Engine = Depends(get_engine),
                      owner: str | None = Depends(get_owner)) -> Any:
    session_id = openai_compat.session_of(engine, body.model)
    openai_compat.refuse_unsupported(body)
    seed = openai_compat.new_seed(body)
    openai_compat.sampling_of(engine, body, seed)  # bad sampling values fail before any work
    if session_id is not None:
        engine.sessions.info(session_id, owner)
    prompts = await run_in_threadpool(openai_compat.encode_prompts, engine, session_id, body)
    completion_id, created = "cmpl-" + uuid.uuid4().hex, int(time.time())
    if body.stream:
        return await _stream_completion(body, engine, session_id, prompts[0], seed, owner, completion_id, created)
    results = await openai_compat.generate_all(engine, request, session_id, prompts, body, seed, owner)
    logprobs = (await openai_compat.score_choices(engine, request, session_id, prompts, results, body, owner)
                if body.logprobs is not None else [None] * len(results))
    return Completion(id=completion_id, created=created, model=body.model, usage=_usage(prompts, results),
                      choices=openai_compat.choices(prompts, results, logprobs, body))


async def _stream_completion(body: CompletionRequest, engine: Engine, session_id: str | None,
                             prompt: openai_compat.Prompt, seed: int, owner: str | None, completion_id: str,
                             created: int) -> Any:
    sampling = openai_compat.sampling_of(engine, body, seed)

    def chunk(text: str, finish: str | None, usage: CompletionUsage | None = None, choices: bool = True) -> str:
        return Completion(id=completion_id, created=created, model=body.model, usage=usage,
                          choices=[CompletionChoice(text=text, finish_reason=finish)] if choices else []
                          ).model_dump_json(exclude_none=usage is None)

    bridge = EventBridge()
    handle = await run_in_threadpool(engine.submit_generate, session_id, prompt.ids, sampling, owner,
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
        yield {"data": chunk("", openai_compat.FINISH[result.finish_reason])}
        if body.include_usage:
            yield {"data": chunk("", None, _usage([prompt], [result]), choices=False)}
        yield {"data": "[DONE]"}

    return sse(events(), handle)


# ------------------------------------------------------------------------------- tokenize (vLLM)
@router.post("/tokenize", response_model=TokenizeResponse, responses=errors(400, 404))
async def tokenize(body: TokenizeRequest, engine: Engine = Depends(get_engine),
                   owner: str | None = Depends(get_owner)) -> TokenizeResponse:
    """vLLM's ``/tokenize``: the ids of ``prompt`` (every model here shares the base tokenizer)."""
    if body.model is not None:
        session_id = openai_compat.session_of(engine, body.model)
        if session_id is not None:
            engine.sessions.info(session_id, owner)
    ids = await run_in_threadpool(engine.encode, body.prompt, body.add_special_tokens)
    return TokenizeResponse(count=len(ids), max_model_len=engine.limits.max_prompt_tokens, tokens=ids)


@router.get("/tokenizer_info", response_model=TokenizerInfo, responses=errors())
def tokenizer_info(engine: Engine = Depends(get_engine)) -> TokenizerInfo:
    """vLLM's ``/tokenizer_info``: the special tokens of the one tokenizer every model here shares."""
    return TokenizerInfo(**engine.special_tokens(), model_max_length=engine.limits.max_prompt_tokens)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=errors(400, 404))
async def detokenize(body: DetokenizeRequest, engine: Engine = Depends(get_engine),
                     owner: str | None = Depends(get_owner)) -> DetokenizeResponse:
    """vLLM's ``/detokenize``: the text of token ids (special tokens left out)."""
    if body.model is not None:
        session_id = openai_compat.session_of(engine, body.model)
        if session_id is not None:
            engine.sessions.info(session_id, owner)
    bad = [t for t in body.tokens if t >= engine.vocab_size]
    if bad:
        raise BadParameter(f"token id {bad[0]} is out of range [0, {engine.vocab_size})", "tokens")
    return DetokenizeResponse(prompt=await run_in_threadpool(engine.decode, body.tokens))
