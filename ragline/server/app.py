"""FastAPI app factory and lifespan.

The routes are in :mod:`ragline.server.routes`, the request schemas in
:mod:`ragline.server.schemas`, the pure-ASGI middleware (body limit, request
timer) in :mod:`ragline.server.middleware`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from ragline.config import Settings
from ragline.pipeline import AsyncRAG
from ragline.server import admin, errors, jobs, limits, routes
from ragline.server.auth import Auth
from ragline.server.middleware import RequestGuard, Timing
from ragline.server.reload import Live, Loader, Routing

__all__ = ["create_app"]


def create_app(settings: Settings | None = None, rag: AsyncRAG | None = None, reload: Loader | None = None) -> FastAPI:
    """Build the app; the pipeline starts (model load) in the lifespan, before traffic.  ``reload``:
    where a hot reload reads its settings (default ``Settings.load``: the YAML and env, as at start)."""
    settings = settings or Settings.load()
    live = Live(rag or AsyncRAG(settings), settings, reload)  # the serving pipeline, swapped by a hot reload
    pipeline = live.proxy()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        live.handle_sighup()  # SIGHUP: hot reload (each worker process its own)
        await pipeline.start()
        await pipeline.jobs.start()  # takes over the unfinished jobs of processes that died or stopped
        try:
            yield
        finally:
            await live.aclose()

    app = FastAPI(
        title="ragline", version="0.1.0", lifespan=lifespan, description="Cache-first retrieval-augmented generation."
    )
    app.state.rag = pipeline
    app.state.live = live
    app.state.settings = settings
    errors.install(app)
    auth = Auth(settings.server)
    routes.install(app, pipeline, settings, auth)
    jobs.install(app, pipeline, settings, auth)  # background ingest jobs: /v1/jobs
    admin.install(app, live, auth)  # POST /v1/admin/reload
    app.add_middleware(Routing, live=live)  # innermost: a request runs on the pipeline serving at its arrival
    app.add_middleware(RequestGuard, max_bytes=settings.limits.max_request_bytes)
    limits.install(app, settings)  # per-key/tenant limits outside the guard: refused before the body is read
    app.add_middleware(Timing)
    errors.document_errors(app)  # after every route is registered
    return app
