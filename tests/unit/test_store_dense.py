"""The embedded store's dense search: exact below the size threshold, HNSW above it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ragline.store.embedded import EmbeddedStore
from ragline.types import Chunk, Document


def _fill(store: EmbeddedStore, vecs: np.ndarray) -> None:
    docs = []
    for i, v in enumerate(vecs):
        doc = Document(f"d{i}", f"text {i}")
        ch = Chunk(f"d{i}#0", doc.id, 0, doc.text, "", f"h{i}")
        docs.append((doc, f"h{i}", [ch], v.reshape(1, -1)))
    store.upsert("default", docs)


def test_small_index_is_searched_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((600, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    store = EmbeddedStore(tmp_path, 16)
    try:
        _fill(store, vecs)
        for q in vecs[:20] + 0.3 * rng.standard_normal((20, 16)).astype(np.float32):
            got = store.search_dense("default", q, 50)
            sims = vecs @ (q / np.linalg.norm(q))
            want = [f"d{i}#0" for i in np.argsort(-sims)[:50]]
            assert [s.chunk_id for s in got] == want
            assert np.allclose([s.score for s in got], np.sort(sims)[::-1][:50], atol=1e-5)
    finally:
        store.close()


def test_threshold_switches_to_hnsw(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    vecs = rng.standard_normal((300, 16)).astype(np.float32)
    store = EmbeddedStore(tmp_path, 16, exact_below=0)
    try:
        _fill(store, vecs)
        got = store.search_dense("default", vecs[3], 10)
        assert got[0].chunk_id == "d3#0" and len(got) == 10
    finally:
        store.close()
