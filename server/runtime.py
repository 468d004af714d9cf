"""What one app instance owns: its settings, its metrics, the state directory's lock and (once
loaded) the engine.

The lifespan takes the state directory's lock first: a second server on the same directory stops at
start with a clear message. The model is loaded once per app, in a thread started by the lifespan,
so the server answers ``/health`` with 503 (``Retry-After``) while it loads. A failed load is logged
and reported by every request: 503 with the reason, no ``Retry-After``, and a message that says it
will not recover (the process stays up so that a supervisor sees it unhealthy; fix and restart).
When the engine is ready, one summary line says what is serving: model, device, backend, dtype,
threads, preset, state directory, sessions restored, auth.

Shutdown (SIGTERM/SIGINT, seen as soon as the signal arrives): new jobs get 503, queued jobs end at
once with 503 + ``Retry-After`` + ``x-refine-retry-safe``, the running job gets ``shutdown_grace_s``
to finish and is then cancelled the same way; a stream ends with its ``done`` or ``error`` event.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from refine_tta.engine import Unavailable
from server.metrics import ServerMetrics
from server.settings import ServerSettings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from refine_tta.engine import Engine, LoadedModel, SessionStore, StateDirLock
    from refine_tta.threads import ThreadPolicy
    from server.serving import Serving

log = logging.getLogger(__name__)

Loader = Callable[[ServerSettings], "LoadedModel"]


def resolve_device(requested: str) -> tuple[str, str]:
    """The device to load on, and why (``auto``: CUDA when available)."""
    import torch

    if requested != "auto":
        return requested, "requested"
    if torch.cuda.is_available():
        return "cuda", "auto: CUDA is available"
    return "cpu", "auto: no CUDA device"


def load_for_settings(settings: ServerSettings) -> LoadedModel:
    """Load ``settings.model`` on the configured device (logged with the reason)."""
    from refine_tta.engine import load_model

    device, reason = resolve_device(settings.device)
    log.info("loading %s on %s (%s)", settings.model, device, reason)
    loaded = load_model(settings.model, device=device, dtype=settings.dtype, backend=settings.backend)
    if settings.model_name:
        loaded.name = settings.model_name
    return loaded


class Runtime:
    """Settings, metrics and engine of one app; ``lifespan`` starts and stops the engine."""

    retry_after_loading = 5.0

    def __init__(self, settings: ServerSettings, loader: Loader | None = None, *, shared_state_dir: bool = False):
        self.settings = settings
        self.loader = loader or load_for_settings
        self.shared_state_dir = shared_state_dir  # one replica of several on one directory (server.ray_app)
        self.engine: Engine | None = None
        self.serving: Serving | None = None  # the routes' object, once the engine runs
        self.lock: StateDirLock | None = None
        self.error: str | None = None
        self.started_at = time.time()
        self.threads: ThreadPolicy | None = None  # set by the ``serve`` command (it chose the policy)
        self.address: str | None = None  # where ``serve`` listens
        self._closing = False
        self.metrics = ServerMetrics(lambda: None if self.engine is None else self.engine.metrics())

    def status_message(self) -> str:
        if self.error is not None:
            return (f"the model failed to load: {self.error}. The server will not recover from this: fix the "
                    f"cause and restart it")
        if self._closing:
            return "the server is shutting down"
        return "the model is loading; retry shortly"

    def unavailable(self) -> Unavailable:
        """The error for a request that needs the engine while there is none (no retry after a failed load)."""
        return Unavailable(self.status_message(), retry_after=None if self.error is not None
                           else self.retry_after_loading)

    def summary(self, loaded: LoadedModel, store: SessionStore) -> str:
        """The one start-up line: what serves, where, with what."""
        import torch

        s = self.settings
        threads = self.threads.describe() if self.threads else f"{torch.get_num_threads()} threads (torch default)"
        refused = f", {len(store.refused)} refused (other model)" if store.refused else ""
        auth = f"{len(s.api_keys)} API key{'s' if len(s.api_keys) != 1 else ''}" if s.api_keys else "none"
        where = f" on {self.address}" if self.address else ""
        return (f"ready{where}: model {loaded.name} on {loaded.device} ({loaded.backend.name} kernels, "
                f"{str(loaded.dtype).replace('torch.', '')}); threads: {threads}; preset {s.refine_preset}"
                f"{' + ' + str(s.refine_defaults) if s.refine_defaults else ''}; state dir {s.state_dir}: "
                f"{len(store)} sessions restored{refused}; auth: {auth}")

    def warn_unowned(self, store: SessionStore) -> None:
        """Under key auth, sessions made without a key belong to nobody who can call: say so, and how to fix it."""
        if not self.settings.api_keys:
            return
        unowned = store.list(None)
        if unowned:
            d = self.settings.state_dir
            log.warning("%d sessions in %s have no owner (made before API keys were set): no key can use them. "
                        "List them: refine-tta sessions list --state-dir %s; give them to a key: refine-tta sessions "
                        "adopt --state-dir %s --api-key KEY; or delete them: refine-tta sessions delete --state-dir "
                        "%s (with the server stopped)", len(unowned), d, d, d, d)

    def start_engine(self) -> None:
        """Load the model, open the session store, start the worker (runs in a thread)."""
        from refine_tta.engine import Engine, EngineLimits, SessionStorage, SessionStore

        s = self.settings
        try:
            loaded = self.loader(s)
            store = SessionStore(SessionStorage(s.state_dir, loaded.fingerprint, self.lock),
                                 memory_budget_bytes=s.session_memory_bytes, disk_budget_bytes=s.session_disk_bytes,
                                 prune_at_start=s.prune_sessions_at_start, device=loaded.device)
            limits = EngineLimits(max_document_tokens=s.max_document_tokens, max_prompt_tokens=s.max_prompt_tokens,
                                  max_new_tokens=s.max_new_tokens, max_steps=s.max_steps, queue_size=s.queue_size,
                                  max_rollout_tokens=s.max_rollout_tokens, max_lora_rank=s.max_lora_rank)
            engine = Engine(loaded, store, limits, retry_after=s.retry_after_s).start()
        except Exception as exc:
            log.exception("could not start the engine")
            self.error = f"{type(exc).__name__}: {exc}"
            return
        if self._closing:
            engine.stop()
            return
        from server.serving import Serving

        self.engine = engine
        self.serving = Serving(engine, s.adapt_defaults, self.started_at)
        log.info("%s", self.summary(loaded, store))
        self.warn_unowned(store)

    def begin_shutdown(self) -> None:
        """Stop taking work and give the running job its grace period (returns at once)."""
        self._closing = True
        engine = self.engine
        if engine is not None:
            engine.begin_shutdown(self.settings.shutdown_grace_s, retry_after=self.retry_after_loading)

    def _watch_signals(self) -> Callable[[], None]:
        """Chain SIGTERM/SIGINT to :meth:`begin_shutdown` ahead of the ASGI server's own handler
        (which stops accepting connections and waits for open requests). Returns the undo. Only in
        the main thread, and only over a handler that is a Python callable (the server's)."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        installed: dict[int, tuple[object, object]] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)
            if not callable(previous):
                continue

            def handler(signum: int, frame: object, previous: Callable = previous) -> None:
                # A signal handler must not take locks the interrupted code may hold: hand over.
                threading.Thread(target=self.begin_shutdown, name="refine-tta-shutdown", daemon=True).start()
                previous(signum, frame)

            signal.signal(sig, handler)
            installed[sig] = (handler, previous)

        def undo() -> None:
            for sig, (handler, previous) in installed.items():
                if signal.getsignal(sig) is handler:
                    signal.signal(sig, previous)

        return undo

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        from refine_tta.engine import LockMode, StateDirLock, StateDirLocked

        mode = LockMode.SHARED if self.shared_state_dir else LockMode.EXCLUSIVE
        try:
            self.lock = StateDirLock.acquire(self.settings.state_dir, mode)
        except StateDirLocked as exc:
            log.error("refusing to start: %s", exc)
            raise
        unwatch = self._watch_signals()
        loading = asyncio.create_task(asyncio.to_thread(self.start_engine))
        try:
            yield
        finally:
            self.begin_shutdown()
            await loading  # a thread cannot be interrupted; loading ends on its own
            engine, self.engine, self.serving = self.engine, None, None
            if engine is not None:
                await asyncio.to_thread(engine.stop)
            self.lock.release()
            unwatch()
