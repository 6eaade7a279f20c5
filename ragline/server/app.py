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
from ragline.conversation import Conversations
from ragline.pipeline import AsyncRAG
from ragline.server import conversation_routes, errors, jobs, limits, openai_routes, routes
from ragline.server.auth import Auth
from ragline.server.middleware import RequestGuard, Timing

__all__ = ["create_app"]


def create_app(settings: Settings | None = None, rag: AsyncRAG | None = None) -> FastAPI:
    """Build the app; the pipeline starts (model load) in the lifespan, before traffic."""
    settings = settings or Settings.load()
    pipeline = rag or AsyncRAG(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await pipeline.start()
        await pipeline.jobs.start()  # takes over the unfinished jobs of processes that died or stopped
        try:
            yield
        finally:
            await pipeline.aclose()

    app = FastAPI(
        title="ragline", version="0.1.0", lifespan=lifespan, description="Cache-first retrieval-augmented generation."
    )
    app.state.rag = pipeline
    app.state.settings = settings
    errors.install(app)
    auth = Auth(settings.server)
    routes.install(app, pipeline, settings, auth)
    app.state.conversations = conversations = Conversations(pipeline)  # conversation_id turns
    conversation_routes.install(app, conversations, auth)
    openai_routes.install(app, conversations, settings, auth)  # /v1/chat/completions, /v1/models
    jobs.install(app, pipeline, settings, auth)  # background ingest jobs: /v1/jobs
    app.add_middleware(RequestGuard, max_bytes=settings.limits.max_request_bytes)
    limits.install(app, settings)  # per-key/tenant limits outside the guard: refused before the body is read
    app.add_middleware(Timing)
    errors.document_errors(app)  # after every route is registered
    return app
