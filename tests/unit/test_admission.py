"""Admission control: bounded work, a short queue, fast 503s past it; exact hits never wait."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from ragline.config import Settings
from ragline.errors import ServiceUnavailable
from ragline.infra.admission import Admission
from ragline.pipeline import AsyncRAG
from ragline.testing import HashEmbedder, ScriptedLLM
from ragline.types import Document, Vectors


async def test_bounded_work_then_a_short_queue_then_fast_refusals() -> None:
    adm = Admission(limit=2, queue=1, timeout_s=5)
    release = asyncio.Event()

    async def work() -> None:
        async with adm.slot():
            await release.wait()

    running = [asyncio.ensure_future(work()) for _ in range(3)]  # two admitted, one queued
    await asyncio.sleep(0.01)
    assert (adm.in_flight, adm.waiting) == (2, 1)
    t0 = time.perf_counter()
    with pytest.raises(ServiceUnavailable) as err:
        async with adm.slot():
            pass
    assert time.perf_counter() - t0 < 0.05  # refused at once, not after a wait
    assert err.value.status == 503 and err.value.retry_after is not None and err.value.retry_after >= 1
    release.set()
    await asyncio.gather(*running)
    assert adm.admitted == 3 and adm.rejected == 1 and adm.in_flight == 0


async def test_a_queued_request_gives_up_at_its_deadline() -> None:
    adm = Admission(limit=1, queue=4, timeout_s=0.05)
    hold = asyncio.Event()

    async def holder() -> None:
        async with adm.slot():
            await hold.wait()

    h = asyncio.ensure_future(holder())
    await asyncio.sleep(0)
    with pytest.raises(ServiceUnavailable, match="at capacity"):
        async with adm.slot():
            pass
    hold.set()
    await h


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    adm = Admission(limit=1, queue=1, timeout_s=5)
    hold = asyncio.Event()

    async def holder() -> None:
        async with adm.slot():
            await hold.wait()

    async def waiter() -> None:
        async with adm.slot():
            pass

    h = asyncio.ensure_future(holder())
    await asyncio.sleep(0)
    w = asyncio.ensure_future(waiter())
    await asyncio.sleep(0.01)
    assert adm.waiting == 1
    w.cancel()
    await asyncio.sleep(0.01)
    assert adm.waiting == 0
    hold.set()
    await h
    async with adm.slot():  # capacity is intact
        pass


class SlowEmbedder(HashEmbedder):
    def __init__(self) -> None:
        super().__init__()
        self.delay_s = 0.0

    def embed(self, texts: list[str]) -> Vectors:
        time.sleep(self.delay_s)
        out: Vectors = super().embed(texts)
        return np.asarray(out)


async def test_exact_hits_are_served_while_misses_are_refused(tmp_path: Path) -> None:
    s = Settings(
        data_dir=tmp_path / "d",
        cache={"enabled": True, "redis_url": None, "semantic": False},
        limits={"max_concurrent_work": 1, "max_queued_work": 0},
    )
    emb = SlowEmbedder()
    async with AsyncRAG(s, embedder=emb, llm=ScriptedLLM()) as rag:
        await rag.ingest([Document("a", "The Eiffel Tower opened in 1889.")])
        await rag.ask("When did the Eiffel Tower open?")
        emb.delay_s = 0.3
        slow = asyncio.ensure_future(rag.ask("Something never asked before?"))
        await asyncio.sleep(0.05)
        with pytest.raises(ServiceUnavailable):
            await rag.ask("Another new question?")  # a miss: no slot, no queue
        hit = await rag.ask("When did the Eiffel Tower open?")  # a hit: never waits for a slot
        assert hit.cache.kind == "exact"
        await slow
