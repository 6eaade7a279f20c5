"""One tenant's derived indexes in the embedded store: usearch (dense), tantivy (BM25), key → chunk id.

Both indexes are rebuilt from SQLite when they disagree with it (no embedding: vectors are stored),
and kept in step with the change log (:mod:`ragline.store.changelog`): a writer applies its own
change, every other process applies the published rows.  Applying a row is idempotent and checks
SQLite for what still exists, so rows applied late or twice converge on the committed state.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import numpy as np
import tantivy

import ragline.infra.native  # noqa: F401  # isort: skip  (loaded before usearch: see that module)
from usearch.index import Index

from ragline.types import Scored, Vectors

__all__ = ["TenantIndex"]


_ADD_THREADS = 1
"""usearch's ``add`` runs its inserts on every core by default, and concurrent inserts can strand a node
that the graph then never reaches (unum-cloud/USearch#735, open; fix proposed in #772): measured here,
1-7 of every 1,000-4,000 clustered vectors could not find themselves, and a SciFact store built by the
same ingest lost 0.0086 dense nDCG@10 in one build of three.  One thread: none stranded in 10 builds,
and a 384-d insert costs ~0.17 ms (1.6x the parallel time), against ~30 ms to embed the chunk."""
_SEARCH_THREADS = 1
"""One query's search on the calling thread: usearch's default (every core) splits nothing for a single
vector and only adds a hand-off to its pool (a 400-entry index: 74 µs per search with the default, 49 µs
with one thread)."""


def _dense_index(dim: int) -> Index:
    return Index(ndim=dim, metric="cos", dtype="f32", connectivity=16, expansion_add=128, expansion_search=64)


class TenantIndex:
    """The dense and keyword index of one tenant plus the key → chunk-id map (guard with ``lock``)."""

    def __init__(self, root: Path, dim: int) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.dense_path = root / "dense.usearch"
        self.keyword_dir = root / "keyword"
        self.dim = dim
        self.dense = _dense_index(dim)
        self.keyword_dir.mkdir(exist_ok=True)
        sb = tantivy.SchemaBuilder()
        sb.add_integer_field("key", stored=True, indexed=True, fast=True)
        sb.add_text_field("body", stored=False, tokenizer_name="en_stem")
        self.schema = sb.build()
        self.keyword = tantivy.Index(self.schema, path=str(self.keyword_dir), reuse=True)
        # reload only when a change is applied: a reader that followed another process's commits on
        # its own would rank with keyword statistics the rest of its state has not caught up with
        self.keyword.config_reader("Manual")
        self.key_to_chunk: dict[int, str] = {}
        self.lock = threading.RLock()

    # -- opening -------------------------------------------------------------------------
    def load(self, db: sqlite3.Connection, tenant: str) -> tuple[bool, bool]:
        """Read the key map from SQLite and the saved dense index from disk; returns whether the dense
        and the keyword index agree with SQLite (same keys; same document count)."""
        rows = db.execute("SELECT key, chunk_id FROM chunks WHERE tenant=?", (tenant,)).fetchall()
        self.key_to_chunk = {int(k): str(c) for k, c in rows}
        dense_ok = False
        if self.dense_path.exists():
            try:
                self.dense.load(str(self.dense_path))
                keys = np.fromiter(self.key_to_chunk, dtype=np.uint64, count=len(self.key_to_chunk))
                dense_ok = len(self.dense) == len(keys) and bool(np.all(self.dense.contains(keys)))
            except (RuntimeError, ValueError):  # a file another process was replacing: rebuild
                dense_ok = False
        else:
            dense_ok = not rows
        self.keyword.reload()
        keyword_ok = self.keyword.searcher().num_docs == len(rows)
        return dense_ok, keyword_ok

    def rebuild_dense(self, db: sqlite3.Connection, tenant: str) -> None:
        self.dense = _dense_index(self.dim)
        cur = db.execute("SELECT key, vector FROM chunks WHERE tenant=?", (tenant,))
        while batch := cur.fetchmany(2048):
            keys = np.fromiter((int(r[0]) for r in batch), dtype=np.uint64, count=len(batch))
            vecs = np.frombuffer(b"".join(r[1] for r in batch), dtype=np.float32).reshape(-1, self.dim)
            self.dense.add(keys, vecs, threads=_ADD_THREADS)

    def rebuild_keyword(self, db: sqlite3.Connection, tenant: str) -> None:
        """Only under the tenant's writer lock (:class:`~ragline.store.changelog.TenantLocks`)."""
        w = self._writer()
        w.delete_all_documents()
        cur = db.execute("SELECT key, title, text FROM chunks WHERE tenant=?", (tenant,))
        while batch := cur.fetchmany(2048):
            for key, title, text in batch:
                w.add_document(tantivy.Document(key=int(key), body=f"{title}\n{text}"))
        self._commit(w)

    # -- search ----------------------------------------------------------------------------
    def search_dense(self, vector: Vectors, k: int) -> list[Scored]:
        with self.lock:
            if len(self.dense) == 0:
                return []
            m = self.dense.search(vector.reshape(-1), min(k, len(self.dense)), threads=_SEARCH_THREADS)
            k2c = self.key_to_chunk
            out = [
                Scored(k2c[int(key)], 1.0 - float(d))
                for key, d in zip(m.keys, m.distances, strict=False)
                if int(key) in k2c
            ]
        out.sort(key=_rank_order)  # equal scores: a stable order that does not depend on index layout
        return out

    def search_keyword(self, text: str, k: int) -> list[Scored]:
        """``text``: a plain disjunction of terms (no query syntax)."""
        q, _errors = self.keyword.parse_query_lenient(text, ["body"])
        searcher = self.keyword.searcher()
        res = searcher.search(q, k)
        out: list[Scored] = []
        k2c = self.key_to_chunk
        for score, addr in res.hits:
            cid = k2c.get(int(searcher.doc(addr)["key"][0]))
            if cid is not None:  # a key this process has not applied yet (or no longer has)
                out.append(Scored(cid, float(score)))
        # tantivy orders equal scores by segment and doc address, which change when segments
        # merge in the background: order ties by chunk id so one index state gives one ranking
        out.sort(key=_rank_order)
        return out

    # -- changes -------------------------------------------------------------------------
    def write(self, old_keys: list[int], new_rows: list[tuple[int, str, str, Vectors]]) -> None:
        """The writer's own change: both indexes (tantivy is committed, so other processes can load it)."""
        w = self._writer()
        for key in old_keys:
            self.key_to_chunk.pop(key, None)
            if self.dense.contains(key):
                self.dense.remove(key)
            w.delete_documents_by_term("key", key)
        if new_rows:
            keys = np.array([r[0] for r in new_rows], dtype=np.uint64)
            self.dense.add(keys, np.stack([r[3] for r in new_rows]).astype(np.float32), threads=_ADD_THREADS)
            for key, cid, body, _ in new_rows:
                self.key_to_chunk[key] = cid
                w.add_document(tantivy.Document(key=key, body=body))
        self._commit(w)

    def rewrite_keyword(self, db: sqlite3.Connection, keys: list[int]) -> None:
        """Re-apply a dead writer's change to the keyword index (idempotent: delete, then add what
        SQLite still holds); under the tenant's writer lock."""
        w = self._writer()
        for key in keys:
            w.delete_documents_by_term("key", key)
        for key, title, text in _rows(db, "SELECT key, title, text FROM chunks WHERE key IN ({})", keys):
            w.add_document(tantivy.Document(key=int(key), body=f"{title}\n{text}"))
        self._commit(w)

    def follow(self, db: sqlite3.Connection, removed_keys: tuple[int, ...], added_keys: tuple[int, ...]) -> None:
        """Another process's published change: the dense index and key map from SQLite, the keyword
        reader from the writer's commit."""
        for key in removed_keys:
            self.key_to_chunk.pop(key, None)
            if self.dense.contains(key):
                self.dense.remove(key)
        rows = _rows(db, "SELECT key, chunk_id, vector FROM chunks WHERE key IN ({})", list(added_keys))
        fresh = [(int(k), str(c), v) for k, c, v in rows if not self.dense.contains(int(k))]
        if fresh:
            keys = np.array([r[0] for r in fresh], dtype=np.uint64)
            vecs = np.frombuffer(b"".join(r[2] for r in fresh), dtype=np.float32).reshape(-1, self.dim)
            self.dense.add(keys, vecs, threads=_ADD_THREADS)
        for key, cid, _ in rows:
            self.key_to_chunk[int(key)] = str(cid)
        self.keyword.reload()

    def save(self) -> None:
        """Persist the dense index (a unique temporary name, then an atomic rename: processes sharing
        the directory may save at the same time)."""
        tmp = self.dense_path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        self.dense.save(str(tmp))
        tmp.replace(self.dense_path)

    def _writer(self) -> Any:
        return self.keyword.writer(heap_size=64_000_000, num_threads=1)

    def _commit(self, w: Any) -> None:
        w.commit()
        # Finish background segment merges before anyone searches: merges purge deleted docs,
        # which changes BM25 statistics.  Left running, they would change rankings at a random
        # later moment, with no write to invalidate cached results against.
        w.wait_merging_threads()
        self.keyword.reload()


def _rank_order(s: Scored) -> tuple[float, str]:
    return (-s.score, s.chunk_id)


def _rows(db: sqlite3.Connection, sql: str, keys: list[int]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for i in range(0, len(keys), 500):
        batch = keys[i : i + 500]
        out.extend(db.execute(sql.format(",".join("?" * len(batch))), batch).fetchall())
    return out
