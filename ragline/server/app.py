"""FastAPI app factory and lifespan.

The routes are in :mod:`ragline.server.routes`, the request schemas in
:mod:`ragline.server.schemas`, the pure-ASGI middleware (body limit, request
timer) in :mod:`ragline.server.middleware`, the exact-hit fast path of
``POST /v1/query`` in :mod:`ragline.server.fastpath`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from ragline.config import Settings
from ragline.conversation import Conversations
from ragline.pipeline import AsyncRAG
from ragline.server import admin, conversation_routes, errors, jobs, limits, openai_routes, routes
from ragline.server.auth import Auth
from ragline.server.fastpath import ExactHitPath
from ragline.server.middleware import RequestGuard, Timing
from ragline.server.reload import Live, Loader, Routing
from ragline.server.shedding import Shedder

__all__ = ["create_app"]


def _telemetry() -> dict[str, Any]:
    """FastAPI's native OpenTelemetry (FastAPI ≥ 0.16x) asks the global providers on every request
    whether one is configured: three environment lookups per request, ~15 µs of a ~160 µs hello world
    in process (docs/NOTES.md).  Off, unless OpenTelemetry is configured through its environment
    (any ``OTEL_*`` variable, or ``FASTAPI_OTEL_AUTO_CONFIGURE``): then FastAPI's default stays."""
    if os.environ.get("FASTAPI_OTEL_AUTO_CONFIGURE") or any(k.startswith("OTEL_") for k in os.environ):
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


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
        title="ragline",
        version="0.1.0",
        lifespan=lifespan,
        description="Cache-first retrieval-augmented generation.",
        **_telemetry(),
    )
    app.state.rag = pipeline
    app.state.live = live
    app.state.settings = settings
    errors.install(app)
    auth = Auth(settings.server)
    routes.install(app, pipeline, settings, auth)
    app.state.conversations = conversations = Conversations(pipeline)  # conversation_id turns
    conversation_routes.install(app, conversations, auth)
    openai_routes.install(app, conversations, settings, auth)  # /v1/chat/completions, /v1/models
    jobs.install(app, pipeline, settings, auth)  # background ingest jobs: /v1/jobs
    admin.install(app, live, auth)  # POST /v1/admin/reload
    app.add_middleware(Routing, live=live)  # innermost: a request runs on the pipeline serving at its arrival
    shedder = Shedder(pipeline, auth, settings.retrieval.k)  # 503 before routing when admission is full
    app.add_middleware(RequestGuard, max_bytes=settings.limits.max_request_bytes, shedder=shedder)
    # exact hits of POST /v1/query in pure ASGI, inside the limits and the timer; the rest falls through
    query_route = next(r for r in app.routes if getattr(r, "path", "") == "/v1/query")
    app.add_middleware(
        ExactHitPath, pipeline=pipeline, auth=auth, max_body=routes.query_body_bytes(settings), route=query_route
    )
    limits.install(app, settings)  # per-key/tenant limits outside the guard: refused before the body is read
    app.add_middleware(Timing)
    errors.document_errors(app)  # after every route is registered
    return app
