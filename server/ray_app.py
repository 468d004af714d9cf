"""Several replicas of the server under Ray Serve, each request for a session sent to a replica
that holds it (``refine-tta serve --replicas N``; docs/ray.md).

Two deployments:

- :class:`SessionReplica` (N replicas, one device each: one GPU on a GPU host, one CPU thread
  otherwise) runs the unchanged app of :func:`server.app.create_app`, driven in-process over ASGI,
  on a state directory that all replicas share (a *shared* lock: see docs/session-storage.md).
- :class:`Ingress` (one replica, no device) takes every HTTP request, finds the session it is about
  (:func:`session_of`) and hands it to the replicas with that session id as Ray Serve's
  *multiplexed model id*: Ray's router sends it to a replica that advertises the id and keeps an
  LRU of advertised ids per replica. A replica advertises a session when it adapts it or first
  serves it (loading it, checksum-verified, from the shared store). Requests without a session
  (adapt, lists, health) get Ray's default routing: the less loaded of two replicas (power of two
  choices on their queues; with two replicas, the least loaded).

A delete removes the session from disk (every replica checks the disk before serving a session
from memory, so no replica answers for it once the delete is acknowledged) and each replica drops
deleted sessions from memory within ``SWEEP_S`` seconds.

Every response through the ingress says who answered: ``x-refine-replica`` (Ray's replica id) and
``x-refine-replica-pid``; a generate or completion for a session adds ``x-refine-session-source`` (``memory``:
the replica held it; ``store``: it loaded it from the shared store for this request) and
``x-refine-session-load-ms``.

This module imports Ray; nothing on the single-process path imports it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from server.settings import ServerSettings

if TYPE_CHECKING:
    from fastapi import FastAPI
    from ray.serve import Application

    from refine_tta.threads import ThreadPolicy

log = logging.getLogger(__name__)

APP_NAME = "refine-tta"
ADVERTISED_PER_REPLICA = 256
"""Session ids one replica advertises to the router at most (Ray's per-replica LRU). Tensors in
memory are bounded separately, in bytes, by ``session_memory_bytes``."""
SWEEP_S = 1.0
"""How often a replica drops sessions deleted by another replica from its memory."""
ATTEMPTS = 3
"""Tries of one request when the replica it was sent to died before answering."""
RETRY_SAFE_HEADER = "x-refine-retry-safe"  # as server.errors (not imported: the ingress loads no torch)

_SESSION_PATH = re.compile(r"^/v1/sessions/(sess_[0-9a-f]{32})$")
_SESSION_ID = re.compile(r"^sess_[0-9a-f]{32}$")


# --------------------------------------------------------------------------------------- routing
def session_of(method: str, path: str, body: bytes) -> str | None:
    """The session a request is about, or None (then any replica may answer it).

    ``POST /v1/generate`` -> its ``session_id``; ``POST /v1/completions`` -> its ``model`` when that
    is a session id; ``GET``/``DELETE /v1/sessions/{id}`` -> ``id``. A body that does not parse
    routes nowhere in particular (the replica answers the error)."""
    match = _SESSION_PATH.match(path)
    if match and method in ("GET", "DELETE"):
        return match.group(1)
    field = {"/v1/generate": "session_id", "/v1/completions": "model"}.get(path)
    if field is None or method != "POST":
        return None
    try:
        value = json.loads(body).get(field)
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, str) and _SESSION_ID.match(value) else None


@dataclass(frozen=True)
class ProxiedRequest:
    """An HTTP request as the ingress received it (headers as raw ASGI pairs)."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(frozen=True)
class ResponseStart:
    """The first item of a replica's answer; the body's chunks (bytes) follow."""

    status: int
    headers: list[tuple[bytes, bytes]]


async def asgi_response(app: FastAPI, request: ProxiedRequest,
                        extra_headers: list[tuple[bytes, bytes]]) -> AsyncIterator[ResponseStart | bytes]:
    """Run ``request`` through the ASGI ``app``: a :class:`ResponseStart`, then body chunks as the
    app sends them (streams stay streams). If the consumer stops early (client gone), the app sees
    ``http.disconnect`` and is cancelled."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": request.method, "scheme": "http", "path": request.path, "raw_path": request.path.encode(),
             "query_string": request.query, "root_path": "", "headers": request.headers,
             "client": ("ray-serve-ingress", 0), "server": ("refine-tta-replica", 0), "state": {}}
    messages: asyncio.Queue[dict | None] = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await messages.put(message)

    task = asyncio.create_task(app(scope, receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                yield ResponseStart(message["status"], [*message.get("headers", []), *extra_headers])
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    break
        await task  # the app's own exception, if any (it answered 500 first)
    finally:
        gone.set()
        if not task.done():
            task.cancel()


# -------------------------------------------------------------------------------------- replicas
class _Advertised:
    """A session this replica told the router it holds. When Ray's per-replica LRU drops the id,
    the replica drops the tensors too (their disk copy stays)."""

    def __init__(self, release: Any, session_id: str):
        self._release, self.session_id = release, session_id

    def __del__(self) -> None:
        self._release(self.session_id)


@serve.deployment(name="SessionReplica")
class SessionReplica:
    """One replica: the refine-tta app (its own engine and device worker) on the shared store."""

    async def __init__(self, settings: ServerSettings, threads: ThreadPolicy | None):
        from refine_tta.threads import apply_thread_policy
        from server.app import create_app

        if threads is not None:  # its environment (OMP_*) was set by Ray before torch loaded
            apply_thread_policy(threads)
        self.app = create_app(settings, shared_state_dir=True)
        self.runtime = self.app.state.runtime
        self.runtime.threads = threads
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # shared lock on the state directory, model loading starts
        while self.runtime.engine is None and self.runtime.error is None:
            await asyncio.sleep(0.05)
        if self.runtime.error is not None:
            await self._lifespan.__aexit__(None, None, None)
            raise RuntimeError(self.runtime.status_message())
        self.name = serve.get_replica_context().replica_id.unique_id
        self._headers = [(b"x-refine-replica", self.name.encode()),
                         (b"x-refine-replica-pid", str(os.getpid()).encode())]
        self._sweeper = asyncio.create_task(self._sweep())
        log.info("replica %s (pid %d) ready", self.name, os.getpid())

    @serve.multiplexed(max_num_models_per_replica=ADVERTISED_PER_REPLICA)
    async def advertise(self, session_id: str) -> _Advertised:
        """Registers ``session_id`` with Ray's router as held here (the tensors are already loaded)."""
        return _Advertised(self._release, session_id)

    def _release(self, session_id: str) -> None:
        engine = self.runtime.engine
        if engine is not None:
            engine.sessions.release(session_id)

    async def _hold(self, session_id: str) -> list[tuple[bytes, bytes]]:
        """Load the session from the shared store unless it is in memory, and advertise it. Errors
        (unknown, damaged, unreadable) are left for the app to answer in its usual way."""
        engine = self.runtime.engine
        if engine is None:
            return []
        from refine_tta.engine import EngineError

        t0 = time.perf_counter()
        try:
            from_store = await asyncio.to_thread(engine.sessions.preload, session_id)
        except EngineError:
            return []
        load_ms = (time.perf_counter() - t0) * 1000
        await self.advertise(session_id)
        return [(b"x-refine-session-source", b"store" if from_store else b"memory"),
                (b"x-refine-session-load-ms", f"{load_ms:.1f}".encode())]

    async def call(self, request: ProxiedRequest) -> AsyncIterator[ResponseStart | bytes]:
        """Answer one HTTP request: a :class:`ResponseStart`, then the body's chunks."""
        headers = list(self._headers)
        session_id = serve.get_multiplexed_model_id()
        if session_id and request.method == "POST":  # generate, completions: the tensors are needed
            headers += await self._hold(session_id)
        adapting = request.method == "POST" and request.path == "/v1/adapt"
        async for item in asgi_response(self.app, request, headers):
            if adapting:  # a new session is stored before its id is sent: advertise it first
                await self._advertise_new()
            yield item

    async def _advertise_new(self) -> None:
        """Advertise the sessions this replica has stored since the last call (its adaptations)."""
        engine = self.runtime.engine
        if engine is None:
            return
        for session_id in engine.sessions.take_new_ids():
            await self.advertise(session_id)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            engine = self.runtime.engine
            if engine is None:
                continue
            try:
                gone = await asyncio.to_thread(engine.sessions.drop_deleted)
            except Exception:  # never let the sweeper die; the next round tries again
                log.exception("replica %s: sweeping deleted sessions failed", self.name)
                continue
            if gone:
                log.info("replica %s: dropped %d sessions deleted elsewhere", self.name, len(gone))

    async def check_health(self) -> None:
        """Ray's health check: the engine runs (else Ray replaces this replica)."""
        if self.runtime.engine is None:
            raise RuntimeError(self.runtime.status_message())

    async def __del__(self) -> None:
        """Ray's graceful shutdown: the app's own (running job's grace, lock released)."""
        self._sweeper.cancel()
        await self._lifespan.__aexit__(None, None, None)


# --------------------------------------------------------------------------------------- ingress
def _unavailable(message: str) -> Response:
    """503 in the contract's error shape (as server.errors.describe(Unavailable(...)))."""
    return JSONResponse({"error": {"type": "unavailable", "message": message}}, status_code=503,
                        headers={"Retry-After": "2", RETRY_SAFE_HEADER: "true"})


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0})
class Ingress:
    """Every HTTP request: routed by its session (:func:`session_of`) to the replicas."""

    def __init__(self, replicas: DeploymentHandle, max_body_bytes: int):
        self.replicas = replicas
        self.max_body_bytes = max_body_bytes

    async def _body(self, request: Request) -> bytes:
        """The body, cut after ``max_body_bytes + 1`` bytes (the replica answers 413 for it)."""
        chunks, size = [], 0
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > self.max_body_bytes:
                break
        return b"".join(chunks)

    async def __call__(self, request: Request) -> Response:
        body = await self._body(request)
        proxied = ProxiedRequest(request.method, request.url.path, request.url.query.encode(),
                                 list(request.headers.raw), body)
        session_id = session_of(proxied.method, proxied.path, body)
        handle = self.replicas.options(stream=True, **({"multiplexed_model_id": session_id} if session_id else {}))
        for attempt in range(1, ATTEMPTS + 1):
            stream = handle.call.remote(proxied)
            try:
                start = await stream.__anext__()
            except (RayActorError, ActorUnavailableError) as exc:  # the replica died before answering
                log.warning("ingress: replica lost before answering %s %s (try %d of %d): %s", proxied.method,
                            proxied.path, attempt, ATTEMPTS, type(exc).__name__)
                continue
            except Exception as exc:  # a bug in the replica's own code: the contract's 500
                log.error("ingress: %s %s failed in the replica", proxied.method, proxied.path, exc_info=exc)
                return JSONResponse({"error": {"type": "internal_error", "message": f"internal error "
                                               f"({type(exc).__name__}); see the replica's log"}}, status_code=500)
            response = StreamingResponse(_rest(stream), status_code=start.status)
            response.raw_headers = list(start.headers)
            return response
        return _unavailable(f"no replica could answer {proxied.method} {proxied.path} (replicas were lost); "
                            "retry shortly")


async def _rest(stream: Any) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream:
            yield chunk
    finally:
        stream.cancel()  # the client went away: the replica's request is cancelled too


# ------------------------------------------------------------------------------------ assembling
@dataclass(frozen=True)
class ReplicaResources:
    """What one replica takes from Ray, chosen once with the reason (logged). ``threads``: the
    replica's CPU thread policy (None on a GPU: torch's default)."""

    num_cpus: float
    num_gpus: float
    threads: ThreadPolicy | None
    reason: str

    @classmethod
    def choose(cls, device: str, cluster_gpus: float, replicas: int, threads: int | None = None) -> ReplicaResources:
        """One GPU per replica where the cluster has GPUs (and ``device`` allows), else one CPU and
        ``threads`` (default 1) torch threads per replica."""
        from refine_tta.threads import ThreadPolicy

        if device != "cpu" and cluster_gpus >= 1:
            return cls(1, 1, None, f"one GPU per replica ({cluster_gpus:g} GPUs in the Ray cluster, {replicas} "
                                   "replicas; Ray queues replicas that do not fit)")
        why = "--device cpu" if device == "cpu" else "no GPU in the Ray cluster"
        n = threads or 1
        policy = ThreadPolicy(n, "PASSIVE", f"{'--threads' if threads else 'one'} per replica of --replicas; idle "
                                            "threads sleep instead of spinning")
        return cls(n, 0, policy, f"one CPU and {n} torch thread{'s' if n != 1 else ''} per replica ({why})")


def build(settings: ServerSettings, replicas: int, resources: ReplicaResources) -> Application:
    """The Ray Serve application: ``Ingress`` over ``replicas`` x :class:`SessionReplica`."""
    threads_env = {} if resources.threads is None else {
        "OMP_NUM_THREADS": str(resources.threads.threads), "MKL_NUM_THREADS": str(resources.threads.threads)}
    replica = SessionReplica.options(
        num_replicas=replicas,
        # Ray's router holds what does not fit: the engine takes the running job + queue_size waiting,
        # and a finishing job still occupies the worker for a moment after its answer is sent.
        max_ongoing_requests=settings.queue_size,
        graceful_shutdown_timeout_s=settings.shutdown_grace_s + 10,
        health_check_period_s=5,
        ray_actor_options={"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus,
                           "runtime_env": {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", **threads_env}}},
    ).bind(settings, resources.threads)
    return Ingress.bind(replica, settings.max_body_bytes)


def app_builder(args: dict[str, Any]) -> Application:
    """For a Ray Serve config (``import_path: server.ray_app:app_builder``, e.g. KubeRay's
    ``serveConfigV2``): ``args`` = ``{"replicas": N, "settings": {...ServerSettings fields}}``;
    ``REFINE_TTA_*`` environment variables apply as for ``refine-tta serve``."""
    settings = ServerSettings(**args.get("settings", {}))
    replicas = int(args.get("replicas", 2))
    resources = ReplicaResources.choose(settings.device, ray.cluster_resources().get("GPU", 0), replicas,
                                        settings.threads)
    log.info("replicas: %s", resources.reason)
    return build(settings, replicas, resources)


def serve_replicas(settings: ServerSettings, replicas: int) -> int:
    """``refine-tta serve --replicas N``: start (or join, with ``RAY_ADDRESS``) a Ray cluster, run
    the application on ``settings.host:port`` and block until SIGTERM/SIGINT."""
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
             logging_level=settings.log_level.upper())
    resources = ReplicaResources.choose(settings.device, ray.cluster_resources().get("GPU", 0), replicas,
                                        settings.threads)
    log.info("%d replicas: %s", replicas, resources.reason)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build(settings, replicas, resources), name=APP_NAME, route_prefix="/")
        log.info("serving on http://%s:%d with %d replicas", settings.host, settings.port, replicas)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
