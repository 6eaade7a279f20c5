"""The Store extension point: dense search, keyword search, upsert, delete.

A store holds documents, their chunks, the chunk vectors, a dense index and a
keyword index, all partitioned by tenant: no call can see another tenant's
data.  ``upsert`` is atomic per call (all documents land or none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ragline.embed.base import Vectors
from ragline.types import Chunk, Document


@dataclass(frozen=True, slots=True)
class Scored:
    """A chunk id and a retriever's raw score (cosine for dense, BM25 for keyword)."""

    chunk_id: str
    score: float


@dataclass(frozen=True, slots=True)
class DocState:
    """What the store knows of a document: enough to decide whether re-ingest is a no-op."""

    doc_id: str
    content_hash: str
    chunk_ids: tuple[str, ...]


@runtime_checkable
class Store(Protocol):
    def search_dense(self, tenant: str, vector: Vectors, k: int) -> list[Scored]: ...

    def search_keyword(self, tenant: str, query: str, k: int) -> list[Scored]: ...

    def upsert(self, tenant: str, docs: list[tuple[Document, str, list[Chunk], Vectors]]) -> None:
        """Replace each (document, doc content hash, chunks, chunk vectors) atomically."""
        ...

    def delete(self, tenant: str, doc_ids: list[str]) -> list[str]:
        """Delete documents; returns the chunk ids that were removed."""
        ...

    def doc_state(self, tenant: str, doc_ids: list[str]) -> dict[str, DocState]: ...

    def chunks(self, tenant: str, chunk_ids: list[str]) -> dict[str, Chunk]: ...

    def vectors(self, tenant: str, chunk_ids: list[str]) -> Vectors: ...

    def stats(self, tenant: str | None = None) -> dict[str, int]: ...

    def close(self) -> None: ...
