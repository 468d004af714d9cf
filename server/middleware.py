"""Pure ASGI middleware (streaming-safe): request id + metrics, API-key auth, request body limit.

Order, outermost first: :class:`RequestContextMiddleware` -> :class:`AuthMiddleware` ->
:class:`BodyLimitMiddleware` -> the app. So even a 401 or a 413 carries ``x-request-id`` and is
counted, and a body is only read once the caller is known.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable

from starlette.datastructures import Headers, MutableHeaders
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import AuthenticationFailed, BodyTooLarge, PermissionDenied, describe, leaf_routes
from server.metrics import ServerMetrics

REQUEST_ID_HEADER = "x-request-id"
access_log = logging.getLogger("server.access")  # one INFO line per request (client, method, path, status, ms, id)
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"


def owner_of(api_key: str) -> str:
    """The owner recorded on sessions: a hash of the key (the key itself is never stored)."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:32]


class RequestContextMiddleware:
    """Gives every request an id (the client's ``x-request-id`` if sane, else a new one), echoes it
    on the response, records status and latency (until the last body byte) per route and in one
    access-log line (logger ``server.access``, INFO), and turns an
    unhandled exception into the contract's 500 body (so even a bug's answer carries the id)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, routes: Callable[[], Iterable]):
        self.app, self.metrics, self.routes = app, metrics, routes

    def _route(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is None:  # answered before routing (401, 413): find the route it was meant for
            for candidate in leaf_routes(list(self.routes())):
                match, _ = candidate.matches(scope)
                if match == Match.FULL:
                    route = candidate
                    break
        return getattr(route, "path", None) or "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = incoming if _REQUEST_ID_RE.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()
        status = 500
        recorded = False
        started = False

        def record() -> None:
            nonlocal recorded
            if not recorded:
                recorded = True
                seconds = time.perf_counter() - start
                self.metrics.observe(self._route(scope), scope["method"], status, seconds)
                access_log.info("%s %s %s %d %.1f ms id=%s", _client(scope), scope["method"], scope["path"], status,
                                seconds * 1000, request_id)

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                record()

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # a bug: answer 500 in the contract's shape (logged by describe)
            if started:
                raise
            await describe(exc).response()(scope, receive, send_with_id)
        finally:
            record()  # a stream cut by the client still counts, with the status it started with


def key_matches(candidate: bytes, keys: list[bytes]) -> bool:
    """Whether ``candidate`` is one of ``keys``, comparing against every key (no early exit), each
    in constant time, so the time taken says nothing about which key (if any) matched."""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key)
    return matched


class AuthMiddleware:
    """With keys configured, every path except ``open_paths`` needs ``Authorization: Bearer <key>``.

    ``operator_paths`` (``/metrics``) take only the operator key (``metrics_key``): a tenant key
    there is a 403, so no tenant sees other tenants' counts. Without any tenant keys and without an
    operator key, everything is open (a local development server).
    Sets ``scope["state"]["owner"]`` (a hash of the tenant key, or None without keys)."""

    def __init__(self, app: ASGIApp, api_keys: list[str], open_paths: frozenset[str] = frozenset({"/health"}),
                 operator_key: str | None = None, operator_paths: frozenset[str] = frozenset({"/metrics"})):
        self.app = app
        self.keys = [key.encode("utf-8") for key in api_keys]
        self.operator_keys = [operator_key.encode("utf-8")] if operator_key else []
        self.open_paths = open_paths
        self.operator_paths = operator_paths

    @staticmethod
    def _token(scope: Scope) -> str:
        header = Headers(scope=scope).get("authorization")
        if not header:
            raise AuthenticationFailed("missing API key: send the header 'Authorization: Bearer <key>'",
                                       "missing_api_key")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationFailed("malformed Authorization header: expected 'Bearer <key>'", "invalid_api_key")
        return token

    def _check(self, scope: Scope) -> str:
        token = self._token(scope)
        if not key_matches(token.encode("utf-8"), self.keys):
            raise AuthenticationFailed("invalid API key")
        return owner_of(token)

    def _check_operator(self, scope: Scope) -> None:
        token = self._token(scope).encode("utf-8")
        operator, tenant = key_matches(token, self.operator_keys), key_matches(token, self.keys)
        if operator:
            return
        if tenant:
            raise PermissionDenied("this route is for the operator: send the operator key (metrics_key, "
                                   "REFINE_TTA_METRICS_KEY), not a tenant API key")
        raise AuthenticationFailed("invalid operator key")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        owner = None
        path = scope["path"]
        try:
            if path in self.operator_paths:
                if self.keys or self.operator_keys:
                    self._check_operator(scope)
            elif self.keys and path not in self.open_paths:
                owner = self._check(scope)
        except (AuthenticationFailed, PermissionDenied) as exc:
            await describe(exc).response()(scope, receive, send)
            return
        scope.setdefault("state", {})["owner"] = owner
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a body over ``limit`` bytes: at once from ``Content-Length``, or as soon as the
    streamed (chunked) body passes the limit, whatever the app had started to do with it."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await describe(BodyTooLarge(self.limit, int(declared))).response()(scope, receive, send)
            return
        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    exceeded = True
                    raise BodyTooLarge(self.limit)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:  # the app's answer to the failed read (a 400 or 500) is replaced by our 413
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            pass
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await describe(BodyTooLarge(self.limit)).response()(scope, receive, send)
