"""CachedEmbedder: the embedding cache in front of the micro-batched model (DESIGN.md §2 step 3).

Queries go cache → micro-batcher → model; ingest batches go cache → one model
call for the rest (in a worker thread).  Both store what they computed.  The
cache is anything with ``get_vectors``/``put_vectors`` (the
:class:`~ragline.cache.layer.CacheLayer`); without one this is the batcher.
"""

from __future__ import annotations

from collections.abc import Sequence
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
        self, embedder: Embedder, cache: VectorCache | None, *, max_batch: int = 64, max_wait_ms: float = 0.0
    ) -> None:
        self.embedder = embedder
        self.cache = cache
        self.dim = embedder.dim
        self.batcher = MicroBatcher(embedder, max_batch=max_batch, max_wait_ms=max_wait_ms)

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

        The model runs once for all misses (not through the
        micro-batcher: an ingest batch is already a full batch).
        """
        out: list[Vectors | None] = [None] * len(texts)
        if self.cache is not None and texts:
            for i, v in (await self.cache.get_vectors(tenant, texts, self.dim)).items():
                out[i] = v
        todo = [i for i, v in enumerate(out) if v is None]
        if todo:
            missing = [texts[i] for i in todo]
            vecs = await embed_async(self.embedder, missing)
            metrics.EMBEDDED.inc(len(todo))
            for i, v in zip(todo, vecs, strict=True):
                out[i] = v
            if self.cache is not None:
                await self.cache.put_vectors(tenant, missing, vecs)
        return [v if v is not None else np.zeros(self.dim, np.float32) for v in out], len(todo)

    async def aclose(self) -> None:
        await self.batcher.aclose()
