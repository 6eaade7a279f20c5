"""Conversation routes: ``conversation_id`` turns of ``POST /v1/query`` and ``GET/DELETE
/v1/conversations/{id}`` (tenant-scoped: another tenant's id is a 404).

A turn's answer is the pipeline's answer to its standalone question (:mod:`ragline.conversation`), with
``conversation`` (id, turn number, standalone question) spliced into the JSON, or sent as the first
event of a stream.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from fastapi import FastAPI, Header
from starlette.responses import Response, StreamingResponse

from ragline import metrics
from ragline.codec import response_bytes
from ragline.conversation import Conversations, Event
from ragline.server.auth import Auth
from ragline.types import CacheMode

__all__ = ["install", "query_turn"]

Sse = Callable[[AsyncIterator[Event]], AsyncIterator[bytes]]


async def query_turn(
    conversations: Conversations,
    tenant: str,
    question: str,
    k: Any,
    conversation_id: object,
    mode: CacheMode,
    body: dict[str, Any],
    sse: Sse,
) -> Response:
    """``POST /v1/query`` with a ``conversation_id`` (validated there: the other fields)."""
    cid = conversations.check_id(conversation_id)
    p = await conversations.prepare(tenant, question, conversation_id=cid, k=k, cache_mode=mode)
    head = b'{"conversation":' + orjson.dumps(p.info()) + b","
    if body.get("stream") is True:
        events = await conversations.ask_stream(p, k, mode)

        async def with_turn() -> AsyncIterator[Event]:
            yield "conversation", p.info()
            async for e in events:
                yield e

        return StreamingResponse(
            sse(with_turn()),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    t0 = time.perf_counter()
    timings: dict[str, float] | None = {} if body.get("timings", True) is not False else None
    answer, info = await conversations.ask_body(p, k, mode, timings)
    metrics.ANSWERS.labels(info.kind).inc()
    if timings is not None:
        timings["total"] = round((time.perf_counter() - t0) * 1000, 3)
    return Response(head + response_bytes(answer, info, timings)[1:], media_type="application/json")


def install(app: FastAPI, conversations: Conversations, auth: Auth) -> None:
    """``GET`` and ``DELETE /v1/conversations/{id}``."""

    def tenant_of(authorization: str | None, x_api_key: str | None) -> str:
        return auth.tenant(auth.key_from_headers(authorization, x_api_key))

    @app.get("/v1/conversations/{conversation_id}", summary="A conversation's turns and summary")
    async def get_conversation(
        conversation_id: str, authorization: str | None = Header(None), x_api_key: str | None = Header(None)
    ) -> Response:
        tenant = tenant_of(authorization, x_api_key)
        data = await conversations.get(tenant, conversation_id)
        return Response(orjson.dumps(data), media_type="application/json")

    @app.delete("/v1/conversations/{conversation_id}", summary="Delete a conversation")
    async def delete_conversation(
        conversation_id: str, authorization: str | None = Header(None), x_api_key: str | None = Header(None)
    ) -> Response:
        tenant = tenant_of(authorization, x_api_key)
        await conversations.delete(tenant, conversation_id)
        return Response(orjson.dumps({"deleted": conversation_id}), media_type="application/json")
