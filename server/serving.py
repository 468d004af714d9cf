"""The one object the routes talk to: HTTP requests in, engine jobs out, results back as bodies or events.

:class:`Serving` owns the translation from a typed request to an engine job (settings over the
server's defaults, sampling with the server's caps), the server-sent-event streams (built in one
place, :meth:`Serving._stream`), the OpenAI completions (batches, ``n``, ``echo``, ``logprobs``:
the translation lives in :mod:`server.openai_compat`) and vLLM's tokenizer routes. It uses only the
engine's public surface (``refine_tta.engine``). Routes stay a few lines each: validate, call, return.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from refine_tta.engine import Engine, InvalidSettings, JobHandle, RefineConfig, SamplingConfig
from server import openai_compat
from server.errors import BadParameter, bad_sampling, describe
from server.schemas import (
    AdaptRequest,
    AdaptResponse,
    CompletionRequest,
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

DEFAULT_MAX_TOKENS = 64  # /v1/generate (/v1/completions: openai_compat.DEFAULT_MAX_TOKENS, as OpenAI's)

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
            raise bad_sampling(exc) from None

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
        """OpenAI ``POST /v1/completions``: ``model`` names a session or the base model; a batch of
        prompts, ``n``, ``echo`` and ``logprobs`` (:mod:`server.openai_compat`)."""
        engine = self.engine
        session_id = openai_compat.session_of(engine, body.model)
        openai_compat.refuse_unsupported(body)
        seed = openai_compat.new_seed(body)
        sampling = openai_compat.sampling_of(engine, body, seed)  # bad sampling values fail before any work
        if session_id is not None:
            engine.sessions.info(session_id, owner)
        prompts = await run_in_threadpool(openai_compat.encode_prompts, engine, session_id, body)
        completion = openai_compat.CompletionBodies(body.model, include_usage=body.include_usage)
        if body.stream:  # one prompt, n = 1 (refuse_unsupported)
            prompt = prompts[0]
            return await self._stream(
                lambda on_text: engine.submit_generate(session_id, prompt.ids, sampling, owner, on_text),
                item=lambda piece, token: {"data": completion.chunk(piece, None)},
                done=lambda result: completion.last_chunks(prompt, result),
                error=lambda exc: {"data": describe(exc).json()})
        results = await openai_compat.generate_all(engine, request, session_id, prompts, body, seed, owner)
        logprobs = (await openai_compat.score_choices(engine, request, session_id, prompts, results, body, owner)
                    if body.logprobs is not None else [None] * len(results))
        return completion.whole(prompts, results, logprobs, body)

    # ------------------------------------------------------------------------- tokenize (vLLM)
    def _check_model(self, model: str | None, owner: str | None) -> None:
        """404 unless ``model`` (if given) is the base model or one of the caller's sessions."""
        if model is not None and (session_id := openai_compat.session_of(self.engine, model)) is not None:
            self.engine.sessions.info(session_id, owner)

    async def tokenize(self, body: TokenizeRequest, owner: str | None) -> TokenizeResponse:
        """vLLM's ``/tokenize``: the ids of ``prompt`` (every model here shares the base tokenizer)."""
        self._check_model(body.model, owner)
        ids = await run_in_threadpool(self.engine.encode, body.prompt, body.add_special_tokens)
        return TokenizeResponse(count=len(ids), max_model_len=self.engine.limits.max_prompt_tokens, tokens=ids)

    async def detokenize(self, body: DetokenizeRequest, owner: str | None) -> DetokenizeResponse:
        """vLLM's ``/detokenize``: the text of token ids (special tokens left out)."""
        self._check_model(body.model, owner)
        bad = [t for t in body.tokens if t >= self.engine.vocab_size]
        if bad:
            raise BadParameter(f"token id {bad[0]} is out of range [0, {self.engine.vocab_size})", "tokens")
        return DetokenizeResponse(prompt=await run_in_threadpool(self.engine.decode, body.tokens))

    def tokenizer_info(self) -> TokenizerInfo:
        """vLLM's ``/tokenizer_info``: the special tokens of the one tokenizer every model here shares."""
        return TokenizerInfo(**self.engine.special_tokens(), model_max_length=self.engine.limits.max_prompt_tokens)

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

