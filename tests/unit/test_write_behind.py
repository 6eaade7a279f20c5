"""Write-behind: cache writes that only serve later requests land after the response, in order, and a
reader of their key (or a closing cache) waits for them; nothing is lost and a failure stays a miss."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ragline.cache.behind import WriteBehind
from ragline.config import Settings
from ragline.pipeline import AsyncRAG
from ragline.testing import HashEmbedder
from ragline.types import Document


async def test_writes_run_behind_in_order_and_a_reader_waits() -> None:
    wb, log = WriteBehind(), []

    async def write(tag: str, delay: float) -> None:
        await asyncio.sleep(delay)
        log.append(tag)

    await wb.submit("k", write("first", 0.02))
    await wb.submit("k", write("second", 0.0))  # same key: after the first, though it is quicker
    await wb.submit(None, write("other", 0.0))
    assert log == [] and len(wb) == 3  # the caller did not wait for any of them
    assert await wb.wait("k") is True
    assert log[-2:] == ["first", "second"]
    assert await wb.wait("k") is False  # nothing pending any more
    await wb.drain()
    assert sorted(log) == ["first", "other", "second"] and len(wb) == 0 and wb.written == 3


async def test_order_free_writes_wait_for_requests_computing() -> None:
    """A write of no key submitted while a request computes starts when the last one ends (or after
    ``defer_s``); a keyed write does not wait (a reader of its key may be next)."""
    wb, log = WriteBehind(defer_s=5.0), []

    async def write(tag: str) -> None:
        log.append(tag)

    async with wb.foreground():
        async with wb.foreground():
            await wb.submit(None, write("vector"))
            await wb.submit("k", write("answer"))
            await asyncio.sleep(0.01)
            assert log == ["answer"]
        await asyncio.sleep(0.01)
        assert log == ["answer"]  # one request still computing
    await asyncio.sleep(0.01)
    assert log == ["answer", "vector"]

    quick = WriteBehind(defer_s=0.01)  # bounded: a busy server still writes
    async with quick.foreground():
        await quick.submit(None, write("late"))
        await asyncio.sleep(0.05)
        assert log[-1] == "late"
    await quick.drain()


async def test_a_failed_write_is_dropped_and_the_limit_applies_back_pressure() -> None:
    wb, done = WriteBehind(limit=1), []

    async def boom() -> None:
        raise RuntimeError("disk full")

    async def ok() -> None:
        done.append(1)

    await wb.submit("a", boom())
    assert await wb.wait("a") is True  # the failure is not raised to the reader
    gate = asyncio.Event()

    async def slow() -> None:
        await gate.wait()

    await wb.submit("b", slow())
    await wb.submit("c", ok())  # one is pending: this one runs in place
    assert done == [1] and wb.inline == 1
    gate.set()
    await wb.drain()


async def test_closing_drains_pending_writes_into_the_disk_tier(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    async with AsyncRAG(settings, embedder=HashEmbedder()) as rag:
        await rag.ingest([Document("a", "Reciprocal rank fusion merges rankings without calibrating scores.")])
        await rag.ask("what does reciprocal rank fusion merge")
    async with AsyncRAG(settings, embedder=HashEmbedder()) as rag:  # a new process: L1 empty, L3 on disk
        again = await rag.ask("what does reciprocal rank fusion merge")
        assert again.cache.kind == "exact" and again.cache.tier == "l3"


@pytest.mark.parametrize("provider_has_aembed", [False, True])
async def test_the_micro_batch_wait_defaults_by_embedder_kind(tmp_path: Path, provider_has_aembed: bool) -> None:
    class Remote(HashEmbedder):
        async def aembed(self, texts: list[str]) -> object:
            return self.embed(texts)

    emb = Remote() if provider_has_aembed else HashEmbedder()
    async with AsyncRAG(Settings(data_dir=tmp_path), embedder=emb) as rag:
        assert rag._embed is not None
        assert rag._embed.batcher.max_wait == (0.002 if provider_has_aembed else 0.0)
    explicit = Settings(data_dir=tmp_path, embedder={"micro_batch_wait_ms": 3.0})
    async with AsyncRAG(explicit, embedder=HashEmbedder()) as rag:
        assert rag._embed is not None and rag._embed.batcher.max_wait == 0.003
