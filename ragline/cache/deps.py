"""Dependency records of cached answers and retrieval results (DESIGN.md §3.1).

Every cached answer or retrieval result is stored with what it depends on:

* the chunk ids of *every candidate* either retriever returned (a change to
  any of them can reorder the fused list, so all of them are dependencies),
* each retriever's cutoff score (the score of its last candidate; ``None``
  when it returned fewer than its depth, i.e. any new match would enter),
* the query vector and the query's analysed keyword terms,
* the context chunk ids actually used, in order (what "stale" is judged on).

Reverse indexes map chunk id → entries and term → entries, so an ingest finds
exactly the entries it may affect instead of flushing everything.  The index
is a small SQLite database next to the L3 cache, so it survives restarts as
long as the cached entries it guards do.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from ragline.embed.base import Vectors

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    entry_key TEXT PRIMARY KEY, tenant TEXT NOT NULL, record BLOB NOT NULL, expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_tenant ON entries (tenant);
CREATE TABLE IF NOT EXISTS chunk_deps (tenant TEXT NOT NULL, chunk_id TEXT NOT NULL, entry_key TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS chunk_deps_idx ON chunk_deps (tenant, chunk_id);
CREATE INDEX IF NOT EXISTS chunk_deps_entry ON chunk_deps (entry_key);
CREATE TABLE IF NOT EXISTS term_deps (tenant TEXT NOT NULL, term TEXT NOT NULL, entry_key TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS term_deps_idx ON term_deps (tenant, term);
CREATE INDEX IF NOT EXISTS term_deps_entry ON term_deps (entry_key);
"""


@dataclass(frozen=True, slots=True)
class DepRecord:
    """What one cached entry depends on; enough to re-check it without embedding."""

    entry_key: str
    tenant: str
    query: str
    qvec: Vectors
    terms: tuple[str, ...]
    candidate_ids: tuple[str, ...]
    context_ids: tuple[str, ...]
    dense_cutoff: float | None
    keyword_cutoff: float | None
    k: int
    mmr: bool
    extra_keys: tuple[str, ...] = ()
    """Other cache keys to drop together with this entry (e.g. its semantic record)."""
    doc_level: bool = False
    candidates: int | None = None

    def to_bytes(self) -> bytes:
        return orjson.dumps({
            "q": self.query, "v": self.qvec.astype(np.float32).tobytes().hex(), "t": self.terms,
            "c": self.candidate_ids, "x": self.context_ids, "dc": self.dense_cutoff,
            "kc": self.keyword_cutoff, "k": self.k, "m": self.mmr, "e": self.extra_keys,
            "dl": self.doc_level, "cd": self.candidates,
        })

    @staticmethod
    def from_bytes(entry_key: str, tenant: str, data: bytes) -> DepRecord:
        d = orjson.loads(data)
        return DepRecord(entry_key, tenant, d["q"], np.frombuffer(bytes.fromhex(d["v"]), dtype=np.float32),
                         tuple(d["t"]), tuple(d["c"]), tuple(d["x"]), d["dc"], d["kc"], d["k"], d["m"],
                         tuple(d.get("e", ())), d.get("dl", False), d.get("cd"))


class DependencyIndex:
    """Persistent reverse indexes chunk → entries and term → entries, per tenant.

    Thread-safe; callers run it in a worker thread (``asyncio.to_thread``).
    An in-memory matrix of query vectors per tenant serves the dense check of
    new chunks (one matrix product for a whole ingest batch).
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()
        self._dense: dict[str, tuple[list[str], Vectors, np.ndarray]] = {}

    def add(self, rec: DepRecord, expires: float) -> None:
        with self._lock:
            db = self._db
            db.execute("BEGIN")
            self._remove([rec.entry_key])
            db.execute("INSERT INTO entries VALUES (?,?,?,?)", (rec.entry_key, rec.tenant, rec.to_bytes(), expires))
            db.executemany("INSERT INTO chunk_deps VALUES (?,?,?)",
                           [(rec.tenant, c, rec.entry_key) for c in set(rec.candidate_ids)])
            db.executemany("INSERT INTO term_deps VALUES (?,?,?)",
                           [(rec.tenant, t, rec.entry_key) for t in set(rec.terms)])
            db.execute("COMMIT")
            self._dense.pop(rec.tenant, None)

    def _remove(self, keys: Sequence[str]) -> None:
        for batch in _batched(list(keys), 500):
            marks = ",".join("?" * len(batch))
            for table in ("entries", "chunk_deps", "term_deps"):
                self._db.execute(f"DELETE FROM {table} WHERE entry_key IN ({marks})", batch)

    def remove(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        with self._lock:
            self._db.execute("BEGIN")
            tenants = self._tenants_of(keys)
            self._remove(keys)
            self._db.execute("COMMIT")
            for t in tenants:
                self._dense.pop(t, None)

    def _tenants_of(self, keys: Sequence[str]) -> set[str]:
        out: set[str] = set()
        for batch in _batched(list(keys), 500):
            marks = ",".join("?" * len(batch))
            out.update(r[0] for r in self._db.execute(
                f"SELECT DISTINCT tenant FROM entries WHERE entry_key IN ({marks})", batch))
        return out

    def by_chunks(self, tenant: str, chunk_ids: Iterable[str]) -> set[str]:
        out: set[str] = set()
        with self._lock:
            for batch in _batched(list(chunk_ids), 500):
                marks = ",".join("?" * len(batch))
                out.update(r[0] for r in self._db.execute(
                    f"SELECT entry_key FROM chunk_deps WHERE tenant=? AND chunk_id IN ({marks})", (tenant, *batch)))
        return out

    def by_terms(self, tenant: str, terms: Iterable[str]) -> set[str]:
        out: set[str] = set()
        with self._lock:
            for batch in _batched(list(terms), 500):
                marks = ",".join("?" * len(batch))
                out.update(r[0] for r in self._db.execute(
                    f"SELECT entry_key FROM term_deps WHERE tenant=? AND term IN ({marks})", (tenant, *batch)))
        return out

    def records(self, tenant: str, keys: Iterable[str]) -> list[DepRecord]:
        out: list[DepRecord] = []
        with self._lock:
            for batch in _batched(list(keys), 500):
                marks = ",".join("?" * len(batch))
                out.extend(DepRecord.from_bytes(k, tenant, r) for k, r in self._db.execute(
                    f"SELECT entry_key, record FROM entries WHERE tenant=? AND entry_key IN ({marks})",
                    (tenant, *batch)))
        return out

    def dense_entered(self, tenant: str, vectors: Vectors) -> set[str]:
        """Entries whose dense candidate list at least one of ``vectors`` would enter.

        A new chunk enters when its cosine to the cached query is ≥ the entry's
        dense cutoff, or when the entry's list was not full (cutoff None).
        """
        if len(vectors) == 0:
            return set()
        with self._lock:
            cached = self._dense.get(tenant)
            if cached is None:
                keys: list[str] = []
                vecs: list[Vectors] = []
                cut: list[float] = []
                for k, r in self._db.execute("SELECT entry_key, record FROM entries WHERE tenant=?", (tenant,)):
                    rec = DepRecord.from_bytes(k, tenant, r)
                    keys.append(k)
                    vecs.append(rec.qvec)
                    cut.append(-np.inf if rec.dense_cutoff is None else rec.dense_cutoff)
                dim = vectors.shape[1]
                cached = (keys, np.stack(vecs) if vecs else np.zeros((0, dim), np.float32),
                          np.asarray(cut, dtype=np.float32))
                self._dense[tenant] = cached
        keys, qvecs, cutoffs = cached
        if not keys:
            return set()
        best = (qvecs @ vectors.T).max(axis=1)
        # a small epsilon: float32 index scores and these scores may differ in the last bits
        return {keys[i] for i in np.nonzero(best >= cutoffs - 1e-5)[0]}

    def tenant_keys(self, tenant: str) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT entry_key FROM entries WHERE tenant=?", (tenant,))]

    def all_keys(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT entry_key FROM entries")]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM entries").fetchone()[0])

    def clear(self, tenant: str | None = None) -> None:
        with self._lock:
            if tenant is None:
                for table in ("entries", "chunk_deps", "term_deps"):
                    self._db.execute(f"DELETE FROM {table}")
                self._dense.clear()
            else:
                for table in ("entries", "chunk_deps", "term_deps"):
                    self._db.execute(f"DELETE FROM {table} WHERE tenant=?", (tenant,))
                self._dense.pop(tenant, None)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _batched(items: list[str], n: int) -> Iterable[list[str]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]
