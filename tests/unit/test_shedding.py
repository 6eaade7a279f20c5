"""Early load shedding (issue 10): while admission is full, a request that would need a slot gets its
503 + Retry-After before routing; a query answered before still reaches the cache; bad input still
gets its 4xx from the route."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from ragline.config import Settings
from ragline.errors import AtCapacity, ServiceUnavailable
from ragline.infra.admission import Admission
from ragline.pipeline import AsyncRAG
from ragline.server.app import create_app
from ragline.testing import HashEmbedder, ScriptedLLM
from ragline.types import Document

ASKED = "When did the Eiffel Tower open?"


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, AsyncRAG]]:
    s = Settings(
        data_dir=tmp_path / "d",
        cache={"enabled": True, "redis_url": None, "semantic": False},
        limits={"max_concurrent_work": 1, "max_queued_work": 0},
    )
    rag = AsyncRAG(s, embedder=HashEmbedder(), llm=ScriptedLLM())
    app = create_app(s, rag)
    async with app.router.lifespan_context(app):
        await rag.ingest([Document("a", "The Eiffel Tower opened in 1889.")])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            assert (await c.post("/v1/query", json={"query": ASKED})).status_code == 200
            yield c, rag


async def _saturate(rag: AsyncRAG) -> tuple[asyncio.Event, asyncio.Future[None]]:
    hold = asyncio.Event()

    async def holder() -> None:
        async with rag.admission.slot():
            await hold.wait()

    h = asyncio.ensure_future(holder())
    await asyncio.sleep(0)
    assert rag.admission.full
    return hold, h


async def test_new_queries_are_shed_before_routing_while_known_ones_are_served(
    served: tuple[httpx.AsyncClient, AsyncRAG],
) -> None:
    c, rag = served
    hold, h = await _saturate(rag)
    before = rag.admission.rejected
    r = await c.post("/v1/query", json={"query": "Something never asked before?"})
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "unavailable"
    assert rag.admission.rejected == before + 1
    bypass = await c.post("/v1/query", json={"query": ASKED, "cache": "bypass"})
    assert bypass.status_code == 503  # a bypass needs a slot whatever was asked before
    search = await c.post("/v1/search", json={"query": "tower"})
    assert search.status_code == 503 and "retry-after" in search.headers
    hit = await c.post("/v1/query", json={"query": ASKED})  # answered before: never shed, served from cache
    assert hit.status_code == 200 and hit.json()["cache"]["kind"] == "exact"
    assert (
        await c.post("/v1/query", content=b"{not json", headers={"content-type": "application/json"})
    ).status_code == 400
    assert (await c.get("/healthz")).status_code == 200
    hold.set()
    await h
    assert not rag.admission.full
    assert (await c.post("/v1/query", json={"query": "Something never asked before?"})).status_code == 200


async def test_admission_refusals_are_not_logged_as_errors(
    served: tuple[httpx.AsyncClient, AsyncRAG], caplog: pytest.LogCaptureFixture
) -> None:
    c, rag = served
    hold, h = await _saturate(rag)
    rag.admission.queue = 1  # not full at the shedder: refused inside the pipeline, after its queue deadline
    rag.admission.timeout_s = 0.01
    with caplog.at_level(logging.ERROR, logger="ragline.server"):
        r = await c.post("/v1/query", json={"query": "A third new question?"})
    assert r.status_code == 503 and "retry-after" in r.headers
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    hold.set()
    await h


async def test_full_and_refuse_early() -> None:
    adm = Admission(limit=1, queue=1, timeout_s=5)
    assert not adm.full
    hold = asyncio.Event()

    async def holder() -> None:
        async with adm.slot():
            await hold.wait()

    tasks = [asyncio.ensure_future(holder()) for _ in range(2)]  # one admitted, one queued
    await asyncio.sleep(0.01)
    assert adm.full
    assert adm.refuse_early() >= 1 and adm.rejected == 1
    with pytest.raises(AtCapacity):
        async with adm.slot():
            pass
    assert issubclass(AtCapacity, ServiceUnavailable)
    hold.set()
    await asyncio.gather(*tasks)
    assert not adm.full


async def test_the_guard_counts_work_that_finished_after_its_client_left() -> None:
    from ragline.server.middleware import RequestGuard

    left = asyncio.Event()

    async def app(scope: object, receive: object, send: object) -> None:
        # the work is shielded (as a single-flight computation another caller awaits would be)
        await asyncio.shield(asyncio.sleep(0.05))

    async def receive() -> dict[str, object]:
        if not left.is_set():
            left.set()
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.disconnect"}

    async def send(msg: object) -> None:
        pass

    guard = RequestGuard(app, max_bytes=1000)  # type: ignore[arg-type]
    scope = {"type": "http", "method": "GET", "path": "/x", "headers": []}
    await guard(scope, receive, send)  # type: ignore[arg-type]
    assert guard.cancelled == 1 and guard.finished_after_disconnect == 0  # cancelled: the shield's waiter left

    async def stubborn(scope: object, receive: object, send: object) -> None:
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            await asyncio.sleep(0.01)  # finishes its work anyway

    left.clear()
    guard = RequestGuard(stubborn, max_bytes=1000)  # type: ignore[arg-type]
    await guard(scope, receive, send)  # type: ignore[arg-type]
    assert guard.finished_after_disconnect == 1
