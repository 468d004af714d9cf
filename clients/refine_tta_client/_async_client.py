"""The asynchronous client, :class:`AsyncRefineClient` (``httpx.AsyncClient``).

Mirrors :class:`~refine_tta_client.RefineClient` method for method; see its docstrings.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

import httpx
import pydantic

from ._base import (
    ClientConfig,
    RequestSpec,
    adapt_spec,
    build_request,
    connection_error,
    error_from_response,
    generate_spec,
    parse_model,
    resolve_config,
    session_path,
)
from ._exceptions import APIConnectionError
from ._models import (
    AdaptEvent,
    AdaptResponse,
    DeleteResponse,
    GenerateEvent,
    GenerateResponse,
    Health,
    SessionInfo,
    SessionList,
)
from ._progress import AdaptProgressBar
from ._retry import DEFAULT_MAX_RETRIES, retry_delay_for_error, retry_delay_for_status
from ._streaming import AsyncStream, decode_adapt_event, decode_generate_event

__all__ = ["AsyncRefineClient", "AsyncSessions"]

log = logging.getLogger("refine_tta_client")

M = TypeVar("M", bound=pydantic.BaseModel)


class AsyncSessions:
    """``client.sessions``: the adapted document states held by the server."""

    def __init__(self, client: AsyncRefineClient) -> None:
        self._client = client

    async def list(self) -> SessionList:
        """``GET /v1/sessions``: every session visible to this API key."""
        return await self._client._request(RequestSpec("GET", "/v1/sessions"), SessionList)

    async def get(self, session_id: str) -> SessionInfo:
        """``GET /v1/sessions/{id}``; raises :class:`NotFoundError` for an unknown id."""
        return await self._client._request(RequestSpec("GET", session_path(session_id)), SessionInfo)

    async def delete(self, session_id: str) -> DeleteResponse:
        """``DELETE /v1/sessions/{id}``; raises :class:`NotFoundError` for an unknown id."""
        return await self._client._request(RequestSpec("DELETE", session_path(session_id)), DeleteResponse)


class AsyncRefineClient:
    """Asynchronous client of a refine-tta server; same arguments as ``RefineClient``, except
    ``http_client`` is an ``httpx.AsyncClient`` and ``sleep`` an async function (default
    ``asyncio.sleep``). Use ``async with`` or ``await client.close()``.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        http_client: httpx.AsyncClient | None = None,
        *,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        self._config: ClientConfig = resolve_config(base_url, api_key, timeout, max_retries)
        self._owns_http = http_client is None
        self._http = (
            http_client if http_client is not None else httpx.AsyncClient(timeout=self._config.timeout)
        )
        self._sleep = sleep if sleep is not None else asyncio.sleep
        self.sessions = AsyncSessions(self)

    @property
    def base_url(self) -> str:
        return self._config.base_url

    @property
    def max_retries(self) -> int:
        return self._config.max_retries

    @property
    def timeout(self) -> httpx.Timeout:
        return self._config.timeout

    # ---------------------------------------------------------------------------------- lifecycle

    async def close(self) -> None:
        """Close the underlying HTTP client if this client created it."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncRefineClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ----------------------------------------------------------------------------------- endpoints

    async def health(self) -> Health:
        """``GET /health``; raises :class:`ServiceUnavailableError` while the model loads."""
        return await self._request(RequestSpec("GET", "/health"), Health)

    @overload
    async def adapt(
        self,
        document: str,
        *,
        stream: Literal[False] = False,
        progress: bool = False,
        mode: str | None = None,
        steps: int | None = None,
        lr: float | None = None,
        n_chunks: int | None = None,
        k: int | None = None,
        n: int | None = None,
        reward: str | None = None,
        selection: str | None = None,
        sft_coef: float | None = None,
        ppo_coef: float | None = None,
        scope: str | None = None,
        seed: int | None = None,
        extra_settings: Mapping[str, Any] | None = None,
        base_session: str | None = None,
    ) -> AdaptResponse: ...

    @overload
    async def adapt(
        self,
        document: str,
        *,
        stream: Literal[True],
        progress: Literal[False] = False,
        mode: str | None = None,
        steps: int | None = None,
        lr: float | None = None,
        n_chunks: int | None = None,
        k: int | None = None,
        n: int | None = None,
        reward: str | None = None,
        selection: str | None = None,
        sft_coef: float | None = None,
        ppo_coef: float | None = None,
        scope: str | None = None,
        seed: int | None = None,
        extra_settings: Mapping[str, Any] | None = None,
        base_session: str | None = None,
    ) -> AsyncStream[AdaptEvent]: ...

    async def adapt(
        self,
        document: str,
        *,
        stream: bool = False,
        progress: bool = False,
        mode: str | None = None,
        steps: int | None = None,
        lr: float | None = None,
        n_chunks: int | None = None,
        k: int | None = None,
        n: int | None = None,
        reward: str | None = None,
        selection: str | None = None,
        sft_coef: float | None = None,
        ppo_coef: float | None = None,
        scope: str | None = None,
        seed: int | None = None,
        extra_settings: Mapping[str, Any] | None = None,
        base_session: str | None = None,
    ) -> AdaptResponse | AsyncStream[AdaptEvent]:
        """``POST /v1/adapt``; see ``RefineClient.adapt``. ``stream=True`` returns an
        :class:`AsyncStream` (``async for event in stream``)."""
        if stream and progress:
            raise ValueError("pass stream=True or progress=True, not both")
        settings = {
            "mode": mode,
            "steps": steps,
            "lr": lr,
            "n_chunks": n_chunks,
            "k": k,
            "n": n,
            "reward": reward,
            "selection": selection,
            "sft_coef": sft_coef,
            "ppo_coef": ppo_coef,
            "scope": scope,
            "seed": seed,
        }
        spec = adapt_spec(document, settings, extra_settings, stream=stream or progress, base_session=base_session)
        if not (stream or progress):
            return await self._request(spec, AdaptResponse)
        events: AsyncStream[AdaptEvent] = AsyncStream(await self._send(spec), decode_adapt_event)
        if stream:
            return events
        bar = AdaptProgressBar()
        try:
            async with events:
                async for event in events:
                    if event.type == "started":
                        bar.start(event.started)
                    elif event.type == "progress":
                        bar.update(event.progress)
                    else:
                        return event.response
        finally:
            bar.close()
        raise APIConnectionError("the event stream ended before its 'done' event")  # unreachable

    @overload
    async def generate(
        self,
        session: str | None,
        prompt: str,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: Literal[False] = False,
    ) -> GenerateResponse: ...

    @overload
    async def generate(
        self,
        session: str | None,
        prompt: str,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: Literal[True],
    ) -> AsyncStream[GenerateEvent]: ...

    async def generate(
        self,
        session: str | None,
        prompt: str,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
    ) -> GenerateResponse | AsyncStream[GenerateEvent]:
        """``POST /v1/generate``; see ``RefineClient.generate``. ``stream=True`` returns an
        :class:`AsyncStream` of :class:`TokenEvent` then one :class:`GenerateDoneEvent`."""
        spec = generate_spec(
            session,
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
            stream=stream,
        )
        if stream:
            return AsyncStream(await self._send(spec), decode_generate_event)
        return await self._request(spec, GenerateResponse)

    # ------------------------------------------------------------------------------------ transport

    async def _request(self, spec: RequestSpec, model: type[M]) -> M:
        return parse_model(await self._send(spec), model)

    async def _send(self, spec: RequestSpec) -> httpx.Response:
        """Send ``spec`` with retries; return a 2xx response (open, unread, when streaming)."""
        attempt = 0
        while True:
            request = build_request(self._http, self._config, spec)
            try:
                response = await self._http.send(request, stream=spec.stream)
            except httpx.TransportError as exc:
                delay = retry_delay_for_error(
                    exc, idempotent=spec.idempotent, attempt=attempt, max_retries=self.max_retries
                )
                if delay is None:
                    raise connection_error(exc) from exc
                reason = type(exc).__name__
            else:
                if response.is_success:
                    return response
                delay = retry_delay_for_status(
                    response.status_code, response.headers, attempt=attempt, max_retries=self.max_retries
                )
                if delay is None:
                    try:
                        await response.aread()
                    except httpx.TransportError:
                        pass  # the status alone still says what went wrong
                    finally:
                        await response.aclose()
                    raise error_from_response(response)
                await response.aclose()
                reason = f"HTTP {response.status_code}"
            attempt += 1
            log.info(
                "%s %s failed (%s); retry %d/%d in %.2fs",
                spec.method,
                spec.path,
                reason,
                attempt,
                self.max_retries,
                delay,
            )
            await self._sleep(delay)
