"""CachedEmbedder: the embedding cache in front of the micro-batched model (DESIGN.md §2 step 3).

Queries go cache → micro-batcher → model; ingest batches go cache → the model
for the rest (in a worker thread).  Both store what they computed.  The
cache is anything with ``get_vectors``/``put_vectors`` (the
:class:`~ragline.cache.layer.CacheLayer`); without one this is the batcher.

Fairness (a local model, which runs one pass at a time): every model call, the
micro-batcher's and the ingest slices of ``ingest_slice`` texts, takes its turn
on one FIFO ``asyncio.Lock``.  A query or another tenant's one-document ingest
then waits for at most one slice of a large ingest (measured: 16 MiniLM chunks,
0.4-0.7 s on 2 cores), not for the whole batch; a remote embedder (``aembed``) has
no turns (its gateway limits concurrency).

A local model runs on one dedicated thread (``ragline-embed``), not on the default executor's pool:
ONNX Runtime's calling thread is one of its intra-op workers, and a pass from whichever pool thread
is free finds that thread's scratch buffers and caches cold.  Measured on the 2-core machine, a
semantic hit's embedding stage 7.5-8.9 → 6.5-6.8 ms p50 (SciFact queries, fp32).  The turns already
allow one pass at a time, so one thread costs no parallelism.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np

from ragline import metrics
from ragline.embed.base import Embedder
from ragline.embed.batcher import MicroBatcher, embed_async
from ragline.types import Vectors


class VectorCache(Protocol):
    async def get_vectors(self, tenant: str, texts: Sequence[str], dim: int) -> dict[int, Vectors]:
        """Cached vectors by position in ``texts`` (misses are absent)."""
        ...

    async def put_vectors(self, tenant: str, texts: Sequence[str], vectors: Vectors) -> None: ...


class CachedEmbedder:
    def __init__(
        self,
        embedder: Embedder,
        cache: VectorCache | None,
        *,
        max_batch: int = 64,
        max_wait_ms: float = 0.0,
        ingest_slice: int = 16,
    ) -> None:
        self.embedder = embedder
        self.cache = cache
        self.dim = embedder.dim
        self.ingest_slice = ingest_slice
        self._turn = None if hasattr(embedder, "aembed") else asyncio.Lock()
        self._thread = None if self._turn is None else ThreadPoolExecutor(1, thread_name_prefix="ragline-embed")
        model: Embedder = embedder if self._turn is None else _Turns(embedder, self._turn, self._thread)
        self.batcher = MicroBatcher(model, max_batch=max_batch, max_wait_ms=max_wait_ms)

    async def embed_query(self, tenant: str, text: str) -> Vectors:
        """One query vector: the embedding cache first, then the micro-batched model."""
        cache = self.cache
        if cache is not None:
            hit = await cache.get_vectors(tenant, [text], self.dim)
            if 0 in hit:
                return hit[0]
        vec: Vectors = (await self.batcher.embed([text]))[0]
        if cache is not None:
            await cache.put_vectors(tenant, [text], vec.reshape(1, -1))
        return vec

    async def embed_texts(self, tenant: str, texts: list[str]) -> tuple[list[Vectors], int]:
        """Vectors of ``texts`` in order, and how many the model computed (the rest were cached).

        The misses go to the model in slices of ``ingest_slice`` texts, each
        taking its turn (not through the micro-batcher: an ingest batch is
        already full); a remote embedder gets them in one call.
        """
        out: list[Vectors | None] = [None] * len(texts)
        if self.cache is not None and texts:
            for i, v in (await self.cache.get_vectors(tenant, texts, self.dim)).items():
                out[i] = v
        todo = [i for i, v in enumerate(out) if v is None]
        if todo:
            missing = [texts[i] for i in todo]
            vecs = await self._embed_many(missing)
            metrics.EMBEDDED.inc(len(todo))
            for i, v in zip(todo, vecs, strict=True):
                out[i] = v
            if self.cache is not None:
                await self.cache.put_vectors(tenant, missing, vecs)
        return [v if v is not None else np.zeros(self.dim, np.float32) for v in out], len(todo)

    async def _embed_many(self, texts: list[str]) -> Vectors:
        turn = self._turn
        if turn is None:
            return await embed_async(self.embedder, texts)
        n = self.ingest_slice
        run = self._on_thread
        if len(texts) <= n:
            async with turn:
                return await run(texts)
        # Slices of similar length (longest first), so that a slice's padding is small; back in order after.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i in range(0, len(order), n):
            idx = order[i : i + n]
            async with turn:
                out[idx] = await run([texts[j] for j in idx])
        return out

    async def _on_thread(self, texts: list[str]) -> Vectors:
        return await _run_on(self._thread, self.embedder, texts)

    async def aclose(self) -> None:
        await self.batcher.aclose()
        if self._thread is not None:
            self._thread.shutdown(wait=False)


class _Turns:
    """The micro-batcher's view of a local model: each pass waits its turn on the shared lock."""

    def __init__(self, embedder: Embedder, turn: asyncio.Lock, thread: ThreadPoolExecutor | None) -> None:
        self._embedder = embedder
        self._turn = turn
        self._thread = thread
        self.id = embedder.id
        self.dim = embedder.dim

    def embed(self, texts: list[str]) -> Vectors:
        return self._embedder.embed(texts)

    async def aembed(self, texts: list[str]) -> Vectors:
        async with self._turn:
            return await _run_on(self._thread, self._embedder, texts)


async def _run_on(thread: ThreadPoolExecutor | None, embedder: Embedder, texts: list[str]) -> Vectors:
    """``embedder.embed`` on the model thread; on a worker thread once that is shut down (a call that
    outlives ``aclose``, e.g. a job a hot reload handed over, still completes)."""
    loop = asyncio.get_running_loop()
    try:
        fut = loop.run_in_executor(thread, embedder.embed, texts)
    except RuntimeError:  # "cannot schedule new futures after shutdown"
        fut = loop.run_in_executor(None, embedder.embed, texts)
    vecs: Vectors = await fut
    return vecs
