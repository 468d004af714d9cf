"""Bridging the worker thread to the event loop, and waiting for jobs without blocking it.

The worker calls plain callbacks (``on_progress``, ``on_text``); :class:`EventBridge` turns them
into items of an ``asyncio.Queue`` with ``loop.call_soon_threadsafe`` and closes the queue when the
job's future is done. A client that goes away cancels its job (queued or running), which frees
the worker at its next check.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from sse_starlette import EventSourceResponse
from starlette.requests import Request

from refine_tta.engine import Cancelled, JobHandle

_DONE = object()
PING_SECONDS = 15.0  # keep-alive comments on idle streams (an adaptation step can take long)
DISCONNECT_POLL_SECONDS = 0.25
SHUTDOWN_STREAM_WAIT_S = 3600.0  # the ASGI server's graceful-shutdown timeout is the real bound


class EventBridge:
    """Items pushed from any thread, read on the loop that created the bridge."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    def push(self, item: Any) -> None:
        """Thread-safe; silently dropped when the loop is gone (client and server went away)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            pass

    def callback(self, wrap: Callable[..., Any]) -> Callable[..., None]:
        """A worker callback that pushes ``wrap(*args)``."""
        return lambda *args: self.push(wrap(*args))

    def attach(self, handle: JobHandle) -> None:
        """End the item stream when the job is done (after everything it pushed)."""
        handle.future.add_done_callback(lambda _: self.push(_DONE))

    async def items(self) -> AsyncIterator[Any]:
        while True:
            item = await self.queue.get()
            if item is _DONE:
                return
            yield item


async def wait_for_job(handle: JobHandle, request: Request) -> Any:
    """The job's result; cancels the job if the client disconnects (or this coroutine is cancelled)."""
    future = asyncio.wrap_future(handle.future)
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return future.result()
            if await request.is_disconnected():
                raise Cancelled("the client disconnected")
    finally:
        if not future.done():
            handle.cancel()
            future.cancel()


def sse(events: AsyncIterator[dict], handle: JobHandle) -> EventSourceResponse:
    """An event-stream response; when it ends for any reason (done, disconnect) the job is cancelled
    (a no-op when it has finished)."""

    async def guarded() -> AsyncIterator[dict]:
        try:
            async for event in events:
                yield event
        finally:
            handle.cancel()

    # At server shutdown the stream is not cut: it runs until the job ends, which the engine
    # bounds (grace period, then 503), so it always closes with its done or error event.
    return EventSourceResponse(guarded(), ping=PING_SECONDS, sep="\n",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                               shutdown_event=anyio.Event(), shutdown_grace_period=SHUTDOWN_STREAM_WAIT_S)
