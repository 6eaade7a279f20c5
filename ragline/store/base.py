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


# -- conversations (``conversation_id``): kept by the store, so every instance serving it sees them --------------
@dataclass(frozen=True, slots=True)
class Turn:
    """One message of a stored conversation.  A user turn keeps the standalone question its retrieval
    used (the next follow-up is condensed from it); an assistant turn keeps its sources' ids."""

    role: str
    """``user`` or ``assistant``."""
    content: str
    standalone: str = ""
    sources: tuple[dict[str, str], ...] = ()
    """``{"doc_id", "chunk_id", "title"}`` per cited source, numbered as the answer cites them."""
    at: float = 0.0
    """When it was stored (Unix seconds)."""

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"role": self.role, "content": self.content, "at": self.at}
        if self.role == "user":
            out["standalone_question"] = self.standalone
        else:
            out["sources"] = list(self.sources)
        return out


@dataclass(frozen=True, slots=True)
class Conversation:
    """A conversation as stored: every turn, plus the summary of the first ``summarized`` of them."""

    id: str
    turns: tuple[Turn, ...] = ()
    summary: str = ""
    summarized: int = 0
    """Messages (from the first) the summary stands for in prompts; the turns themselves are kept."""
    created_at: float = 0.0
    updated_at: float = 0.0


@runtime_checkable
class ConversationStore(Protocol):
    """Conversations per tenant: a store offers one as its ``conversations`` attribute.  Blocking (run in
    threads).  Another tenant's conversation with the same id is a different conversation."""

    def get(self, tenant: str, conversation_id: str) -> Conversation | None: ...

    def append(
        self, tenant: str, conversation_id: str, turns: list[Turn], *, max_messages: int, max_conversations: int
    ) -> int:
        """Add turns (creating the conversation); returns its message count.  ``PayloadTooLarge`` past
        ``max_messages`` messages, or when creating it would exceed ``max_conversations`` of the tenant."""
        ...

    def set_summary(self, tenant: str, conversation_id: str, summary: str, summarized: int) -> None: ...

    def delete(self, tenant: str, conversation_id: str) -> bool: ...

    def prune(self, idle_s: float) -> int:
        """Delete conversations idle for over ``idle_s`` seconds; returns how many."""
        ...
