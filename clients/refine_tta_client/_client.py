"""The synchronous client, :class:`RefineClient` (``httpx.Client``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
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
from ._streaming import Stream, decode_adapt_event, decode_generate_event

__all__ = ["RefineClient", "Sessions"]

log = logging.getLogger("refine_tta_client")

M = TypeVar("M", bound=pydantic.BaseModel)


class Sessions:
    """``client.sessions``: the adapted document states held by the server."""

    def __init__(self, client: RefineClient) -> None:
        self._client = client

    def list(self) -> SessionList:
        """``GET /v1/sessions``: every session visible to this API key."""
        return self._client._request(RequestSpec("GET", "/v1/sessions"), SessionList)

    def get(self, session_id: str) -> SessionInfo:
        """``GET /v1/sessions/{id}``; raises :class:`NotFoundError` for an unknown id."""
        return self._client._request(RequestSpec("GET", session_path(session_id)), SessionInfo)

    def delete(self, session_id: str) -> DeleteResponse:
        """``DELETE /v1/sessions/{id}``; raises :class:`NotFoundError` for an unknown id."""
        return self._client._request(RequestSpec("DELETE", session_path(session_id)), DeleteResponse)


class RefineClient:
    """Synchronous client of a refine-tta server.

    Args:
        base_url: server root; default ``$REFINE_TTA_BASE_URL`` or ``http://127.0.0.1:8000``.
        api_key: sent as ``Authorization: Bearer``; default ``$REFINE_TTA_API_KEY`` (none if unset).
        timeout: seconds (or an ``httpx.Timeout``) per request and between streamed events;
            default ``$REFINE_TTA_TIMEOUT`` or 600 (adaptation can take minutes).
        max_retries: retries after a retryable failure (see ``refine_tta_client._retry``).
        http_client: an ``httpx.Client`` to use (custom transport, proxies); it is not closed by
            :meth:`close`.
        sleep: how to wait between retries (default ``time.sleep``); injectable for tests.

    Use as a context manager, or call :meth:`close`, to release connections.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        http_client: httpx.Client | None = None,
        *,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self._config: ClientConfig = resolve_config(base_url, api_key, timeout, max_retries)
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.Client(timeout=self._config.timeout)
        self._sleep = sleep if sleep is not None else time.sleep
        self.sessions = Sessions(self)

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

    def close(self) -> None:
        """Close the underlying HTTP client if this client created it."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> RefineClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ----------------------------------------------------------------------------------- endpoints

    def health(self) -> Health:
        """``GET /health``; raises :class:`ServiceUnavailableError` while the model loads."""
        return self._request(RequestSpec("GET", "/health"), Health)

    @overload
    def adapt(
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
    def adapt(
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
    ) -> Stream[AdaptEvent]: ...

    def adapt(
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
    ) -> AdaptResponse | Stream[AdaptEvent]:
        """``POST /v1/adapt``: adapt the model to ``document`` and keep the result as a session.

        Settings left at None take the server's defaults; ``extra_settings`` passes settings this
        client version does not know by name. ``base_session``: continue from that session's
        adapted weights (one of yours, adapted with the same scope), e.g. to adapt over a stream
        of documents keeping the latest session.

        Returns the :class:`AdaptResponse`; with ``stream=True`` a :class:`Stream` of one
        :class:`AdaptStartedEvent`, an :class:`AdaptProgressEvent` per step, then one
        :class:`AdaptDoneEvent` (``.response``). With
        ``progress=True`` the call streams under the hood, shows a tqdm bar on stderr and
        returns the :class:`AdaptResponse`.

        Not idempotent: it is retried only on 429/503 or when the request was never sent.
        """
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
            return self._request(spec, AdaptResponse)
        events: Stream[AdaptEvent] = Stream(self._send(spec), decode_adapt_event)
        if stream:
            return events
        bar = AdaptProgressBar()
        try:
            with events:
                for event in events:
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
    def generate(
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
    def generate(
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
    ) -> Stream[GenerateEvent]: ...

    def generate(
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
    ) -> GenerateResponse | Stream[GenerateEvent]:
        """``POST /v1/generate``: continue ``prompt`` with a session's adapted model.

        ``session=None`` uses the base model (empty document). Parameters left at None take the
        server's defaults. Returns the :class:`GenerateResponse`; with ``stream=True`` a
        :class:`Stream` of :class:`TokenEvent` (``.text``, ``.token``) as they are generated,
        then one :class:`GenerateDoneEvent` whose ``.response`` is the full
        :class:`GenerateResponse`. Idempotent given a seed, so retried on transient failures
        (a stream only until its response starts).
        """
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
            return Stream(self._send(spec), decode_generate_event)
        return self._request(spec, GenerateResponse)

    # ------------------------------------------------------------------------------------ transport

    def _request(self, spec: RequestSpec, model: type[M]) -> M:
        return parse_model(self._send(spec), model)

    def _send(self, spec: RequestSpec) -> httpx.Response:
        """Send ``spec`` with retries; return a 2xx response (open, unread, when streaming)."""
        attempt = 0
        while True:
            request = build_request(self._http, self._config, spec)
            try:
                response = self._http.send(request, stream=spec.stream)
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
                        response.read()
                    except httpx.TransportError:
                        pass  # the status alone still says what went wrong
                    finally:
                        response.close()
                    raise error_from_response(response)
                response.close()
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
            self._sleep(delay)
