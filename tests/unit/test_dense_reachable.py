"""Every stored chunk is reachable by dense search: the HNSW graph is built with single-threaded inserts,
because usearch's parallel ``add`` can strand nodes no search reaches (unum-cloud/USearch#735)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ragline.ingest.chunking import doc_hash
from ragline.store.embedded import EmbeddedStore
from ragline.types import Chunk, Document


def test_every_chunk_finds_itself_after_batched_upserts(tmp_path: Path) -> None:
    # clustered unit vectors, like text embeddings: with parallel inserts 1-3 of these 2,000 were stranded
    rng = np.random.default_rng(7)
    n, dim = 2000, 384
    centers = rng.normal(size=(40, dim)).astype(np.float32)
    vecs = centers[rng.integers(0, 40, n)] + 0.6 * rng.normal(size=(n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    store = EmbeddedStore(tmp_path, dim)
    try:
        for start in range(0, n, 64):  # batches, like an ingest's commits
            docs = []
            for i in range(start, min(start + 64, n)):
                doc = Document(f"d{i}", f"text {i}")
                chunk = Chunk(f"d{i}#0", doc.id, 0, doc.text, "", doc_hash(doc), {})
                docs.append((doc, doc_hash(doc), [chunk], vecs[i : i + 1]))
            store.upsert("default", docs)
        stranded = [
            i for i in range(n) if f"d{i}#0" not in {s.chunk_id for s in store.search_dense("default", vecs[i], 10)}
        ]
        assert stranded == []
    finally:
        store.close()
