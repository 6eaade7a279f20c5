"""Micro-batching of embedding calls across concurrent requests.

Continuous batching, no timer: when the model is idle a request runs at once
(no added latency at low load); requests that arrive while a batch is running
queue up and all go into the next forward pass (throughput under load).  An
optional ``max_wait_ms`` lets the first request wait briefly for company.
One batch runs at a time because two concurrent torch passes on 2 cores are
slower than the same work in one pass.
"""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np

from ragline.embed.base import Embedder
from ragline.errors import ServiceUnavailable
from ragline.types import Vectors


async def embed_async(embedder: Embedder, texts: list[str]) -> Vectors:
    """``embedder.aembed`` when it has one (remote embedders: no thread needed), else ``embed`` in a
    worker thread (local models: CPU-bound, kept off the event loop)."""
    aembed = getattr(embedder, "aembed", None)
    if aembed is not None:
        vecs: Vectors = await aembed(texts)
        return vecs
    return await asyncio.to_thread(embedder.embed, texts)


class MicroBatcher:
    def __init__(self, embedder: Embedder, max_batch: int = 64, max_wait_ms: float = 0.0) -> None:
        self.embedder = embedder
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self._queue: asyncio.Queue[tuple[list[str], asyncio.Future[Vectors]]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self.batches = 0
        """Forward passes run (tests and metrics read it)."""

    async def embed(self, texts: list[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self.embedder.dim), dtype=np.float32)
        if self._queue is None or self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run(self._queue))
        fut: asyncio.Future[Vectors] = asyncio.get_running_loop().create_future()
        await self._queue.put((texts, fut))
        return await fut

    async def _run(self, queue: asyncio.Queue[tuple[list[str], asyncio.Future[Vectors]]]) -> None:
        while True:
            batch = [await queue.get()]
            size = len(batch[0][0])
            if self.max_wait:
                await asyncio.sleep(self.max_wait)
            while size < self.max_batch and not queue.empty():
                item = queue.get_nowait()
                batch.append(item)
                size += len(item[0])
            texts = [t for ts, _ in batch for t in ts]
            try:
                vecs = await embed_async(self.embedder, texts)
            except BaseException as exc:  # deliver the failure to every waiter
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(
                            exc if isinstance(exc, Exception) else ServiceUnavailable("embedding cancelled")
                        )
                if not isinstance(exc, Exception):
                    raise
                continue
            self.batches += 1
            start = 0
            for ts, fut in batch:
                if not fut.done():
                    fut.set_result(vecs[start : start + len(ts)])
                start += len(ts)

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._worker
            self._worker = None
