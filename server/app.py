"""The app factory: ``create_app(settings) -> FastAPI``. Nothing is built at import."""

from __future__ import annotations

from fastapi import FastAPI

from server.errors import install_error_handlers
from server.middleware import AuthMiddleware, BodyLimitMiddleware, RequestContextMiddleware
from server.openapi import install_openapi
from server.routes import router
from server.runtime import Loader, Runtime
from server.settings import ServerSettings


def create_app(settings: ServerSettings | None = None, *, loader: Loader | None = None,
               shared_state_dir: bool = False) -> FastAPI:
    """A refine-tta server. ``loader(settings) -> LoadedModel`` replaces the default model loading
    (``load_model(settings.model, ...)``); the model is loaded when the app starts (lifespan).
    ``shared_state_dir``: one of several replicas on one state directory (a shared lock; see
    docs/session-storage.md), instead of its only server (an exclusive lock)."""
    settings = settings if settings is not None else ServerSettings()
    runtime = Runtime(settings, loader, shared_state_dir=shared_state_dir)
    docs = settings.docs
    app = FastAPI(title="refine-tta", summary="Test-time adaptation server for fast-weight language models",
                  version="0.1.0", lifespan=runtime.lifespan, docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None)
    app.state.runtime = runtime
    install_error_handlers(app)
    app.include_router(router)
    open_paths = frozenset({"/health", "/openapi.json"} | ({"/docs", "/redoc"} if docs else set()))
    install_openapi(app, api_keys=bool(settings.api_keys), operator_key=bool(settings.metrics_key),
                    open_paths=open_paths)
    # add_middleware wraps: the last added runs first.
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(AuthMiddleware, api_keys=settings.api_keys, open_paths=open_paths,
                       operator_key=settings.metrics_key)
    app.add_middleware(RequestContextMiddleware, metrics=runtime.metrics, routes=lambda: app.router.routes)
    return app
