"""The one object the routes talk to: HTTP requests in, engine jobs out, results back as bodies or events.

:class:`Serving` owns the translation from a typed request to an engine job (settings over the
server's defaults, sampling with the server's caps), the server-sent-event streams (built in one
place, :meth:`Serving._stream`) and the OpenAI completions translation. It uses only the engine's
public surface (``refine_tta.engine``). Routes stay a few lines each: validate, call, return.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from refine_tta.engine import (
    Engine,
    GenerationResult,
    InvalidSettings,
    JobHandle,
    NotFound,
    RefineConfig,
    SamplingConfig,
    is_session_id,
)
from server.errors import describe
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

DEFAULT_MAX_TOKENS = 64  # /v1/generate
OPENAI_DEFAULT_MAX_TOKENS = 16  # /v1/completions, as OpenAI's
_OPENAI_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}

Event = dict[str, str]


class Serving:
    """Requests -> engine jobs -> responses, for one running engine."""

    def __init__(self, engine: Engine, adapt_defaults: dict[str, Any], started_at: float):
        self.engine = engine
        self.adapt_defaults = adapt_defaults
        self.started_at = started_at

    # ----------------------------------------------------------------------------- translation
    def refine_config(self, given: dict[str, Any]) -> RefineConfig:
        """A request's settings over the server's defaults (400 with the library's message if invalid)."""
        try:
            return RefineConfig.from_dict({**self.adapt_defaults, **given})
        except ValueError as exc:
            raise InvalidSettings(f"invalid settings: {exc}") from None

    def sampling(self, max_tokens: int | None, default_max_tokens: int, temperature: float, top_p: float,
                 seed: int, stop: list[str]) -> SamplingConfig:
        """The request's sampling; ``max_tokens`` None takes the default, capped by the server's limit."""
        if max_tokens is None:
            max_tokens = min(default_max_tokens, self.engine.limits.max_new_tokens)
        try:
            return SamplingConfig(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                  stop=tuple(stop))
        except ValueError as exc:
            raise InvalidSettings(str(exc)) from None

    # ----------------------------------------------------------------------------------- routes
    def health(self) -> Health:
        loaded = self.engine.loaded
        return Health(status="ok", model=loaded.name, device=str(loaded.device), backend=loaded.backend.name)

    async def adapt(self, body: AdaptRequest, request: Request, owner: str | None) -> Any:
        config = self.refine_config(body.settings.given())
        if not body.stream:
            handle = await run_in_threadpool(self.engine.submit_adapt, body.document, config, owner,
                                             base_session=body.base_session)
            return AdaptResponse.of(await wait_for_job(handle, request))
        return await self._stream(
            lambda on_item: self.engine.submit_adapt(body.document, config, owner, on_item, body.base_session),
            item=lambda event, data: {"event": event, "data": json.dumps(data)},  # "started", then "progress"
            done=lambda session: [{"event": "done", "data": AdaptResponse.of(session).model_dump_json()}],
            error=lambda exc: {"event": "error", "data": describe(exc).json()})

    async def generate(self, body: GenerateRequest, request: Request, owner: str | None) -> Any:
        sampling = self.sampling(body.max_tokens, DEFAULT_MAX_TOKENS, body.temperature, body.top_p, body.seed,
                                 body.stops)
        if not body.stream:
            handle = await run_in_threadpool(self.engine.submit_generate, body.session_id, body.prompt, sampling,
                                             owner)
            return GenerateResponse.of(await wait_for_job(handle, request), body.session_id)
        return await self._stream(
            lambda on_text: self.engine.submit_generate(body.session_id, body.prompt, sampling, owner, on_text),
            item=lambda piece, token: {"event": "token", "data": TokenEvent(text=piece, token=token).model_dump_json()},
            done=lambda result: [{"event": "done",
                                  "data": GenerateResponse.of(result, body.session_id).model_dump_json()}],
            error=lambda exc: {"event": "error", "data": describe(exc).json()})

    def sessions(self, owner: str | None) -> SessionList:
        return SessionList(sessions=[SessionInfo.of(s) for s in self.engine.sessions.list(owner)])

    def session(self, session_id: str, owner: str | None) -> SessionInfo:
        return SessionInfo.of(self.engine.sessions.info(session_id, owner))

    def delete(self, session_id: str, owner: str | None) -> DeleteResponse:
        self.engine.sessions.delete(session_id, owner)
        return DeleteResponse(session_id=session_id, deleted=True)

    # ------------------------------------------------------------------------ OpenAI-compatible
    def models(self, owner: str | None) -> ModelList:
        base = ModelCard(id=self.engine.model_name, created=int(self.started_at), owned_by="refine-tta")
        sessions = [ModelCard(id=s.id, created=int(s.created), owned_by="refine-tta-session")
                    for s in self.engine.sessions.list(owner)]
        return ModelList(data=[base, *sessions])

    async def complete(self, body: CompletionRequest, request: Request, owner: str | None) -> Any:
        """OpenAI ``POST /v1/completions``: ``model`` names a session or the base model."""
        session_id = None if body.model == self.engine.model_name else body.model
        if session_id is not None and not is_session_id(session_id):
            raise NotFound(f"model {body.model!r} not found: use a session id or the base model "
                           f"{self.engine.model_name!r}")
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        sampling = self.sampling(body.max_tokens, OPENAI_DEFAULT_MAX_TOKENS, body.temperature, body.top_p, seed,
                                 body.stops)
        completion = _OpenAICompletion(body.model, include_usage=body.include_usage)
        if not body.stream:
            handle = await run_in_threadpool(self.engine.submit_generate, session_id, body.prompt_text, sampling,
                                             owner)
            return completion.whole(await wait_for_job(handle, request))
        return await self._stream(
            lambda on_text: self.engine.submit_generate(session_id, body.prompt_text, sampling, owner, on_text),
            item=lambda piece, token: {"data": completion.chunk(piece, None)},
            done=completion.last_chunks,
            error=lambda exc: {"data": describe(exc).json()})

    # -------------------------------------------------------------------------------- streaming
    async def _stream(self, submit: Callable[[Callable[..., None]], JobHandle], item: Callable[..., Event],
                      done: Callable[[Any], list[Event]], error: Callable[[BaseException], Event]) -> Any:
        """Submit a job whose callback feeds a server-sent-event stream: ``item(*callback args)`` per
        callback, then ``done(result)`` or ``error(exception)``. The job is cancelled if the stream
        ends early (client gone)."""
        bridge = EventBridge()
        handle = await run_in_threadpool(submit, bridge.callback(lambda *args: args))
        bridge.attach(handle)

        async def events() -> AsyncIterator[Event]:
            async for args in bridge.items():
                yield item(*args)
            exc = handle.future.exception()
            if exc is not None:
                yield error(exc)
                return
            for event in done(handle.future.result()):
                yield event

        return sse(events(), handle)


class _OpenAICompletion:
    """The bodies of one OpenAI completion: whole, or as stream chunks."""

    def __init__(self, model: str, include_usage: bool):
        self.id, self.created, self.model = "cmpl-" + uuid.uuid4().hex, int(time.time()), model
        self.include_usage = include_usage

    def _body(self, choices: list[CompletionChoice], usage: CompletionUsage | None = None) -> Completion:
        return Completion(id=self.id, created=self.created, model=self.model, usage=usage, choices=choices)

    @staticmethod
    def usage(result: GenerationResult) -> CompletionUsage:
        return CompletionUsage(prompt_tokens=result.prompt_tokens, completion_tokens=len(result.tokens),
                               total_tokens=result.prompt_tokens + len(result.tokens))

    def whole(self, result: GenerationResult) -> Completion:
        choice = CompletionChoice(text=result.text, finish_reason=_OPENAI_FINISH[result.finish_reason])
        return self._body([choice], self.usage(result))

    def chunk(self, text: str, finish: str | None) -> str:
        return self._body([CompletionChoice(text=text, finish_reason=finish)]).model_dump_json(exclude_none=True)

    def last_chunks(self, result: GenerationResult) -> list[Event]:
        events = [{"data": self.chunk("", _OPENAI_FINISH[result.finish_reason])}]
        if self.include_usage:
            events.append({"data": self._body([], self.usage(result)).model_dump_json()})
        return events + [{"data": "[DONE]"}]
