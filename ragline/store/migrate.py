"""Copy a corpus between stores without embedding anything again (``ragline migrate``).

Reads documents, chunks and their stored vectors from the embedded store's SQLite and upserts them
into the target store a batch of documents at a time, tenant by tenant.  Each batch is one atomic
upsert, so an interrupted migration can simply be run again: documents already copied are replaced
by identical ones (their content hashes match, and an identical chunk is no change to any cache).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

from ragline.store.base import Store
from ragline.store.embedded import EmbeddedStore
from ragline.types import Chunk, Document

__all__ = ["copy_store"]


def copy_store(
    src: EmbeddedStore, dst: Store, *, batch: int = 64, progress: Callable[[str, int], None] | None = None
) -> dict[str, int]:
    """Copy every tenant of ``src`` into ``dst``; returns documents copied per tenant."""
    if getattr(dst, "dim", src.dim) != src.dim:
        raise ValueError(f"the stores hold vectors of different dimensions ({src.dim} vs {dst.dim})")  # type: ignore[attr-defined]
    recorded, set_meta = src.meta("embedder"), getattr(dst, "set_meta", None)
    if recorded is not None and set_meta is not None:  # the vectors keep saying what made them
        set_meta("embedder", recorded)
    db, lock = src._db, src._db_lock
    with lock:
        tenants = [r[0] for r in db.execute("SELECT DISTINCT tenant FROM documents ORDER BY tenant")]
    out: dict[str, int] = {}
    for tenant in tenants:
        with lock:
            docs = db.execute(
                "SELECT doc_id, content_hash, title, source, metadata FROM documents WHERE tenant=? ORDER BY doc_id",
                (tenant,),
            ).fetchall()
        n = 0
        for i in range(0, len(docs), batch):
            part = docs[i : i + batch]
            dst.upsert(tenant, [_row(src, tenant, d) for d in part])
            n += len(part)
            if progress is not None:
                progress(tenant, n)
        out[tenant] = n
    return out


def _row(src: EmbeddedStore, tenant: str, d: tuple[Any, ...]) -> tuple[Document, str, list[Chunk], Any]:
    doc_id, content_hash, title, source, metadata = d
    with src._db_lock:
        rows = src._db.execute(
            "SELECT chunk_id, ordinal, text, title, content_hash, metadata, vector FROM chunks "
            "WHERE tenant=? AND doc_id=? ORDER BY ordinal",
            (tenant, doc_id),
        ).fetchall()
    chunks = [Chunk(r[0], doc_id, int(r[1]), r[2], r[3], r[4], orjson.loads(r[5])) for r in rows]
    vecs = (
        np.stack([np.frombuffer(r[6], dtype=np.float32) for r in rows]) if rows else np.zeros((0, src.dim), np.float32)
    )
    text = "\n\n".join(c.text for c in chunks)  # documents keep no full text: only their chunks matter
    return Document(doc_id, text, title, orjson.loads(metadata), source), content_hash, chunks, vecs
