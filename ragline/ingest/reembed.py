"""Re-embed a stored corpus with another embedder, in place (``ragline reembed``).

Switching embedders (``embedder.provider: local`` to ``onnx``, or to ``quantize: int8``) changes every
vector: a store written by one embedder is refused by the others (:func:`ragline.assembly.check_embedder`),
because queries embedded by one model against chunks embedded by another silently rank nonsense.  This
module makes the switch a command instead of a re-ingest from the original files: it reads every
document's stored chunks back, embeds their indexed text (title + text, exactly what ingest embeds) with
the new embedder, and upserts them with their new vectors.

- **Same chunks, new vectors.**  The chunks, ids, content hashes and metadata are the stored ones, so the
  keyword index and the documents are unchanged, and to the caches an upsert of identical chunks is no
  change.  Nothing stale can be served anyway: every cache key carries the embedder id.
- **Atomic per batch, restartable.**  Each batch of documents is one ``upsert``; other processes on the same
  corpus follow it through the store's change log like any ingest.  Before the first batch the store's
  record says ``embedder = reembedding:<new id>``: a process configured with any other embedder refuses to
  start until the run completes, and an interrupted run is simply run again (re-embedding is idempotent).
- **A document changed meanwhile is skipped**, not overwritten with its older chunks: its content hash is
  read again just before the batch is written.  Its new chunks were embedded by whichever process wrote them,
  so run this while no process with the old embedder writes to the corpus.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ragline.embed.base import Embedder
from ragline.errors import ConfigError
from ragline.store.base import Store
from ragline.types import Chunk, Document, Vectors

__all__ = ["REEMBEDDING", "ReembedReport", "reembed_store"]

REEMBEDDING = "reembedding:"
"""Prefix of the store's ``embedder`` record while a re-embed to the id that follows is under way."""


@dataclass(slots=True)
class ReembedReport:
    """What a run did: per tenant, documents and chunks re-embedded; documents skipped (changed meanwhile)."""

    embedder: str
    previous: str | None
    documents: dict[str, int]
    chunks: dict[str, int]
    skipped: int = 0


def reembed_store(
    store: Store,
    embedder: Embedder,
    *,
    batch_docs: int = 64,
    progress: Callable[[str, int, int], None] | None = None,
) -> ReembedReport:
    """Re-embed every tenant's chunks with ``embedder`` and record it as the store's embedder.

    ``progress(tenant, documents, chunks)`` is called after every batch with the tenant's running totals.
    """
    meta, set_meta = getattr(store, "meta", None), getattr(store, "set_meta", None)
    read_docs, tenants = getattr(store, "documents", None), getattr(store, "tenants", None)
    if meta is None or set_meta is None or read_docs is None or tenants is None:
        raise ConfigError(f"the store {type(store).__name__} cannot be re-embedded in place (it has no record)")
    if batch_docs < 1:
        raise ConfigError("batch_docs must be at least 1")
    previous = meta("embedder")
    set_meta("embedder", REEMBEDDING + embedder.id)
    report = ReembedReport(embedder.id, previous, {}, {})
    for tenant in tenants():
        n_docs = n_chunks = offset = 0
        while ids := store.document_ids(tenant, limit=batch_docs, offset=offset):
            offset += len(ids)  # upserting the same documents keeps the id order, so paging is stable
            rows, skipped = _batch(store, read_docs, embedder, tenant, ids)
            report.skipped += skipped
            if rows:
                store.upsert(tenant, rows)
            n_docs += len(rows)
            n_chunks += sum(len(r[2]) for r in rows)
            if progress is not None:
                progress(tenant, n_docs, n_chunks)
        report.documents[tenant], report.chunks[tenant] = n_docs, n_chunks
    set_meta("embedder", embedder.id)
    return report


def _batch(
    store: Store,
    read_docs: Callable[[str, list[str]], dict[str, Document]],
    embedder: Embedder,
    tenant: str,
    ids: list[str],
) -> tuple[list[tuple[Document, str, list[Chunk], Vectors]], int]:
    """One batch's upsert rows with new vectors, and how many documents changed while it was embedded."""
    states, docs = store.doc_state(tenant, ids), read_docs(tenant, ids)
    stored = store.chunks(tenant, [cid for st in states.values() for cid in st.chunk_ids])
    per_doc = {d: [stored[c] for c in st.chunk_ids if c in stored] for d, st in states.items() if d in docs}
    texts = [c.index_text for cs in per_doc.values() for c in cs]
    vectors = embedder.embed(texts)
    again = store.doc_state(tenant, list(per_doc))
    rows: list[tuple[Document, str, list[Chunk], Vectors]] = []
    skipped, at = 0, 0
    for doc_id, chunks in per_doc.items():
        part, at = vectors[at : at + len(chunks)], at + len(chunks)
        now, st = again.get(doc_id), states[doc_id]
        if now is None or now.content_hash != st.content_hash or now.chunk_ids != st.chunk_ids:
            skipped += 1  # re-ingested or deleted while this batch was embedded: its writer's vectors stay
            continue
        if len(chunks) != len(st.chunk_ids):  # a chunk vanished between the reads: never write a partial document
            skipped += 1
            continue
        if not chunks:
            continue
        d = docs[doc_id]
        text = "\n\n".join(c.text for c in chunks)  # documents keep no full text: only their chunks matter
        rows.append((Document(doc_id, text, d.title, d.metadata, d.source), st.content_hash, chunks, part))
    return rows, skipped
