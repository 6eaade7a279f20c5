"""The Embedder extension point: one narrow method, ``embed``."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ragline.types import Vectors


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into L2-normalised float32 vectors of shape (len(texts), dim).

    ``id`` names the model exactly (it is part of every cache key), ``dim`` is
    the vector width.  ``embed`` is synchronous and CPU/IO bound: callers run it
    in a worker thread (the micro-batcher does this).
    """

    id: str
    dim: int

    def embed(self, texts: list[str]) -> Vectors: ...
