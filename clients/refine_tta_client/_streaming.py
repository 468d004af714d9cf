"""Server-sent events: a line-level decoder, the contract's event payloads, and the
:class:`Stream` / :class:`AsyncStream` iterators returned by ``stream=True`` calls.

The decoder follows the parts of the SSE spec the server uses: ``event:`` names the event,
``data:`` lines are joined with ``\\n``, lines starting with ``:`` are comments (keep-alives), and a
blank line dispatches the event. An event still pending when the connection closes is dispatched
too (lenient; the spec would drop it).
"""

from __future__ import annotations

import json
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Generator,
    Iterable,
    Iterator,
)
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, TypeVar

import httpx

from ._base import connection_error, decode_json, error_from_event, status_error, validate_model
from ._exceptions import APIConnectionError
from ._models import (
    AdaptDoneEvent,
    AdaptEvent,
    AdaptProgress,
    AdaptProgressEvent,
    AdaptStarted,
    AdaptStartedEvent,
    AdaptResponse,
    GenerateDoneEvent,
    GenerateEvent,
    GenerateResponse,
    TokenEvent,
)

__all__ = [
    "ServerSentEvent",
    "SSEDecoder",
    "iter_sse",
    "aiter_sse",
    "decode_adapt_event",
    "decode_generate_event",
    "Stream",
    "AsyncStream",
]

T = TypeVar("T", AdaptEvent, GenerateEvent)


@dataclass(frozen=True)
class ServerSentEvent:
    """One dispatched event: its name (``message`` when unnamed), its data, the last event id."""

    event: str = "message"
    data: str = ""
    id: str | None = None


class SSEDecoder:
    """Incremental ``text/event-stream`` decoder, fed one line at a time (without line ending)."""

    def __init__(self) -> None:
        self._event: str | None = None
        self._data: list[str] = []
        self._last_id: str | None = None

    def decode(self, line: str) -> ServerSentEvent | None:
        """Consume one line; return the event a blank line completes, else None."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):  # comment / keep-alive
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._event = value
        elif field == "data":
            self._data.append(value)
        elif field == "id" and "\0" not in value:
            self._last_id = value
        # "retry" and unknown fields are ignored.
        return None

    def flush(self) -> ServerSentEvent | None:
        """The event pending at end of stream, if any."""
        return self._dispatch()

    def _dispatch(self) -> ServerSentEvent | None:
        if not self._data:  # per spec: no data, no event (the name is reset)
            self._event = None
            return None
        event = ServerSentEvent(event=self._event or "message", data="\n".join(self._data), id=self._last_id)
        self._event, self._data = None, []
        return event


def iter_sse(lines: Iterable[str]) -> Iterator[ServerSentEvent]:
    """Events from an iterable of lines (e.g. ``httpx.Response.iter_lines()``)."""
    decoder = SSEDecoder()
    for line in lines:
        event = decoder.decode(line)
        if event is not None:
            yield event
    event = decoder.flush()
    if event is not None:
        yield event


async def aiter_sse(lines: AsyncIterable[str]) -> AsyncIterator[ServerSentEvent]:
    """Events from an async iterable of lines (e.g. ``httpx.Response.aiter_lines()``)."""
    decoder = SSEDecoder()
    async for line in lines:
        event = decoder.decode(line)
        if event is not None:
            yield event
    event = decoder.flush()
    if event is not None:
        yield event


# --------------------------------------------------------------------------------------------
# contract payloads


def _raise_error_event(sse: ServerSentEvent, headers: httpx.Headers) -> None:
    try:
        data: Any = json.loads(sse.data)
    except ValueError:
        raise status_error(500, sse.data, headers) from None
    raise error_from_event(data, headers)


def decode_adapt_event(sse: ServerSentEvent, headers: httpx.Headers) -> AdaptEvent | None:
    """``started`` / ``progress`` / ``done`` of ``POST /v1/adapt``; raises on ``error``; None for others."""
    if sse.event == "started":
        return AdaptStartedEvent(started=validate_model(AdaptStarted, decode_json(sse.data)))
    if sse.event == "progress":
        return AdaptProgressEvent(progress=validate_model(AdaptProgress, decode_json(sse.data)))
    if sse.event == "done":
        return AdaptDoneEvent(response=validate_model(AdaptResponse, decode_json(sse.data)))
    if sse.event == "error":
        _raise_error_event(sse, headers)
    return None


def decode_generate_event(sse: ServerSentEvent, headers: httpx.Headers) -> GenerateEvent | None:
    """``token`` / ``done`` of ``POST /v1/generate``; raises on ``error``; None for others."""
    if sse.event == "token":
        return validate_model(TokenEvent, decode_json(sse.data))
    if sse.event == "done":
        return GenerateDoneEvent(response=validate_model(GenerateResponse, decode_json(sse.data)))
    if sse.event == "error":
        _raise_error_event(sse, headers)
    return None


_NO_DONE = "the event stream ended before its 'done' event"


# --------------------------------------------------------------------------------------------
# iterators


class Stream(Generic[T]):
    """Iterator over the typed events of one streamed response.

    Ends after the ``done`` event (the last one yielded). An ``event: error`` raises the mapped
    :class:`~refine_tta_client.APIStatusError`; a connection lost mid-stream raises
    :class:`~refine_tta_client.APIConnectionError` (streams are never retried). Close it, or use
    it as a context manager, to release the connection early.
    """

    def __init__(
        self, response: httpx.Response, decode: Callable[[ServerSentEvent, httpx.Headers], T | None]
    ) -> None:
        self.response = response
        self._decode: Callable[[ServerSentEvent, httpx.Headers], T | None] = decode
        self._iterator: Generator[T, None, None] = self._events()

    def _events(self) -> Generator[T, None, None]:
        try:
            for sse in iter_sse(self.response.iter_lines()):
                event = self._decode(sse, self.response.headers)
                if event is None:
                    continue
                yield event
                if event.type == "done":
                    return
        except httpx.TransportError as exc:
            raise connection_error(exc) from exc
        finally:
            self.response.close()
        raise APIConnectionError(_NO_DONE, request=self.response.request)

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        return next(self._iterator)

    def close(self) -> None:
        """Stop reading and release the connection."""
        self._iterator.close()
        self.response.close()

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncStream(Generic[T]):
    """Async iterator over the typed events of one streamed response (see :class:`Stream`)."""

    def __init__(
        self, response: httpx.Response, decode: Callable[[ServerSentEvent, httpx.Headers], T | None]
    ) -> None:
        self.response = response
        self._decode: Callable[[ServerSentEvent, httpx.Headers], T | None] = decode
        self._iterator: AsyncGenerator[T, None] = self._events()

    async def _events(self) -> AsyncGenerator[T, None]:
        try:
            async for sse in aiter_sse(self.response.aiter_lines()):
                event = self._decode(sse, self.response.headers)
                if event is None:
                    continue
                yield event
                if event.type == "done":
                    return
        except httpx.TransportError as exc:
            raise connection_error(exc) from exc
        finally:
            await self.response.aclose()
        raise APIConnectionError(_NO_DONE, request=self.response.request)

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        return await self._iterator.__anext__()

    async def close(self) -> None:
        """Stop reading and release the connection."""
        await self._iterator.aclose()
        await self.response.aclose()

    async def __aenter__(self) -> AsyncStream[T]:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
