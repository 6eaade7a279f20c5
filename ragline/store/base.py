"""The Store extension point: dense search, keyword search, upsert, delete.

A store holds documents, their chunks, the chunk vectors, a dense index and a
keyword index, all partitioned by tenant: no call can see another tenant's
data.  ``upsert`` is atomic per call (all documents land or none).

Besides the four operations, every store implements the same read helpers
(document state, chunks, vectors, ids, counts) and ``analyze``: the terms its
keyword index makes of a text.  Cache invalidation uses ``analyze`` to find the
entries a change can reorder (a change moves the idf of the terms it adds or
removes), so a store with a different keyword analysis (e.g. PostgreSQL's
``to_tsvector``) stays exact by answering it for its own index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ragline.types import Change, Chunk, Document, Scored, Vectors


@dataclass(frozen=True, slots=True)
class DocState:
    """What the store knows of a document: enough to decide whether re-ingest is a no-op."""

    doc_id: str
    content_hash: str
    chunk_ids: tuple[str, ...]


@runtime_checkable
class Store(Protocol):
    # -- the extension point -------------------------------------------------
    def search_dense(self, tenant: str, vector: Vectors, k: int) -> list[Scored]: ...

    def search_keyword(self, tenant: str, query: str, k: int) -> list[Scored]: ...

    def upsert(self, tenant: str, docs: list[tuple[Document, str, list[Chunk], Vectors]]) -> Change:
        """Replace each (document, doc content hash, chunks, chunk vectors) atomically; returns the
        change as every process serving this corpus will learn of it."""
        ...

    def delete(self, tenant: str, doc_ids: list[str]) -> Change:
        """Delete documents (unknown ids are skipped); ``Change.removed`` names their chunks."""
        ...

    # -- one corpus, many processes -------------------------------------------
    def version(self) -> int:
        """A number every committed change of any process moves; cheap enough for the exact-hit path."""
        ...

    def synced_version(self) -> int:
        """The :meth:`version` this process's indexes reflect (they differ: call :meth:`sync`)."""
        ...

    def sync(self) -> list[Change]:
        """Catch up with the changes other processes committed since the last call, and return them:
        the caller's caches must drop what they invalidated."""
        ...

    def recent_changes(self, limit: int) -> list[Change]:
        """The last ``limit`` published changes, oldest first (what the term clock starts from)."""
        ...

    def clock_rows(self) -> list[tuple[str, str, int]]:
        """(tenant, keyword term, seq of the last change that touched it) for the term clock
        (:mod:`ragline.cache.clock`); term ``""`` holds each tenant's last change."""
        ...

    # -- read helpers every store shares --------------------------------------
    def doc_state(self, tenant: str, doc_ids: list[str]) -> dict[str, DocState]:
        """The known documents among ``doc_ids`` (absent ids are unknown)."""
        ...

    def chunks(self, tenant: str, chunk_ids: list[str]) -> dict[str, Chunk]:
        """The known chunks among ``chunk_ids``."""
        ...

    def vectors(self, tenant: str, chunk_ids: list[str]) -> Vectors:
        """Stored vectors in the order of ``chunk_ids`` (zeros for unknown ids)."""
        ...

    def document_ids(self, tenant: str, limit: int = 1000, offset: int = 0) -> list[str]:
        """Document ids in id order, one page."""
        ...

    def analyze(self, text: str) -> list[str]:
        """The terms the keyword index makes of ``text`` (for keyword-driven invalidation)."""
        ...

    def stats(self, tenant: str | None = None) -> dict[str, int]:
        """``{"documents": n, "chunks": m}`` of one tenant, or of all."""
        ...

    def close(self) -> None: ...
