"""A local model's passes run on one dedicated thread (``ragline-embed``); a call that outlives
``aclose`` (a job a hot reload handed over) still completes, on a worker thread."""

from __future__ import annotations

import threading

from ragline.embed.cached import CachedEmbedder
from ragline.testing import HashEmbedder
from ragline.types import Vectors


class _Recording(HashEmbedder):
    def __init__(self) -> None:
        super().__init__()
        self.threads: list[str] = []

    def embed(self, texts: list[str]) -> Vectors:
        self.threads.append(threading.current_thread().name)
        return super().embed(texts)


async def test_passes_run_on_the_model_thread_and_survive_close() -> None:
    model = _Recording()
    emb = CachedEmbedder(model, None, ingest_slice=2)
    await emb.embed_query("default", "a question")
    vecs, computed = await emb.embed_texts("default", ["one", "two", "three"])  # two slices
    assert computed == 3 and len(vecs) == 3
    assert model.threads and all(t.startswith("ragline-embed") for t in model.threads)
    await emb.aclose()
    vecs, _ = await emb.embed_texts("default", ["four"])
    assert len(vecs) == 1 and not model.threads[-1].startswith("ragline-embed")
