"""Dependency records of cached answers and retrieval results (DESIGN.md §3.1, §6).

Every cached answer or retrieval result is stored with what it depends on:

* the chunk ids of *every candidate* either retriever returned (a change to
  any of them can reorder the fused list, so all of them are dependencies),
* each retriever's cutoff score (the score of its last candidate; ``None``
  when it returned fewer than its depth, i.e. any new match would enter);
  the dense one decides which entries a new vector may enter, the keyword one
  is kept for a tighter BM25-drift bound (docs/NOTES.md) and is not read today,
  because every entry sharing a term with a change is re-checked,
* the query vector and the query's analysed keyword terms,
* the context chunk ids actually used (answers are judged on them as a set,
  retrieval results in order).

Reverse indexes map chunk id → entries and term → entries, so an ingest finds
exactly the entries it may affect instead of flushing everything.  Two
implementations share one asynchronous interface (:class:`DepsIndex`, every
I/O method is a coroutine; neither blocks the event loop):

:class:`~ragline.cache.deps_sqlite.DependencyIndex` (one instance)
    a small SQLite database next to the L3 cache, so it survives restarts as
    long as the cached entries it guards do; its SQL runs in worker threads.
    Used when there is no shared L2.

:class:`~ragline.cache.deps_redis.RedisDependencyIndex` (several instances sharing Redis)
    the records live in the same Redis as L2 (redis-py asyncio), so the
    instance that ingests finds the entries *every* instance wrote; it falls
    back to a local SQLite index when Redis cannot be reached (see that module
    for the layout and the failure policy).

This module holds what both share: the record type, the protocol and the
dense-check arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

import numpy as np
import orjson

from ragline.types import Vectors

if TYPE_CHECKING:
    from ragline.cache.crypto import ValueCipher

__all__ = [
    "EPS", "DenseRows", "DepRecord", "DepsIndex", "batched", "dense_hits", "dense_matrix", "load_record",
    "record_bytes", "term_names",
]  # fmt: skip

EPS: Final = 1e-5
"""Float32 index scores and the dense check's scores may differ in the last bits."""


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
        return orjson.dumps(
            {
                "q": self.query,
                "v": self.qvec.astype(np.float32).tobytes().hex(),
                "t": self.terms,
                "c": self.candidate_ids,
                "x": self.context_ids,
                "dc": self.dense_cutoff,
                "kc": self.keyword_cutoff,
                "k": self.k,
                "m": self.mmr,
                "e": self.extra_keys,
                "dl": self.doc_level,
                "cd": self.candidates,
            }
        )

    @staticmethod
    def from_bytes(entry_key: str, tenant: str, data: bytes) -> DepRecord:
        d = orjson.loads(data)
        return DepRecord(
            entry_key,
            tenant,
            d["q"],
            np.frombuffer(bytes.fromhex(d["v"]), dtype=np.float32),
            tuple(d["t"]),
            tuple(d["c"]),
            tuple(d["x"]),
            d["dc"],
            d["kc"],
            d["k"],
            d["m"],
            tuple(d.get("e", ())),
            d.get("dl", False),
            d.get("cd"),
        )


def record_bytes(rec: DepRecord, cipher: ValueCipher | None) -> bytes:
    """A record as stored: sealed when encryption at rest is on (it holds the query text and vector)."""
    data = rec.to_bytes()
    return data if cipher is None else cipher.seal("dep\x00" + rec.entry_key, data)


def load_record(entry_key: str, tenant: str, data: object, cipher: ValueCipher | None) -> DepRecord | None:
    """A stored record, or None for a missing, foreign, malformed or unopenable one (sealed with a key
    no longer configured, or sealed while encryption is off): its entry does not open either."""
    if not isinstance(data, bytes | bytearray | memoryview):
        return None
    raw = bytes(data) if cipher is None else cipher.open("dep\x00" + entry_key, bytes(data))
    if raw is None:
        return None
    try:
        return DepRecord.from_bytes(entry_key, tenant, raw)
    except (ValueError, KeyError, TypeError):  # orjson.JSONDecodeError is a ValueError
        return None


def term_names(cipher: ValueCipher | None, tenant: str, terms: Iterable[str], every: bool = False) -> list[str]:
    """What the reverse index calls ``terms``: the terms themselves, or with encryption at rest their
    keyed hashes (:meth:`ValueCipher.term_names`) under the current key, or under ``every`` key (lookups
    and removals, which must also find what a previous key wrote)."""
    if cipher is None:
        return list(terms)
    if every:
        return [n for t in terms for n in cipher.term_names(tenant, t)]
    return [cipher.term_names(tenant, t)[0] for t in terms]


class DepsIndex(Protocol):
    """What :class:`~ragline.cache.layer.CacheLayer` needs of a dependency index.

    Every method that may do I/O is a coroutine; ``lookup_failures``,
    ``has_local_only`` and ``known_count`` never do I/O.
    """

    @property
    def lookup_failures(self) -> int:
        """Monotonic count of lookups that could not consult every record (always 0 when local)."""
        ...

    @property
    def has_local_only(self) -> bool:
        """True while some records exist only in this instance's fallback index."""
        ...

    async def add(self, rec: DepRecord, expires: float) -> bool:
        """Register (or replace) ``rec``; True if every instance that reads the entry's tiers can see it."""
        ...

    async def remove(self, keys: Sequence[str]) -> None: ...

    async def by_chunks(self, tenant: str, chunk_ids: Iterable[str]) -> set[str]: ...

    async def by_terms(self, tenant: str, terms: Iterable[str]) -> set[str]: ...

    async def records(self, tenant: str, keys: Iterable[str]) -> list[DepRecord]: ...

    async def dense_entered(self, tenant: str, vectors: Vectors) -> set[str]: ...

    async def tenant_keys(self, tenant: str) -> list[str]: ...

    async def all_keys(self) -> list[str]: ...

    async def count(self) -> int:
        """Records in the index (the shared index asks Redis)."""
        ...

    def known_count(self) -> int:
        """Like :meth:`count` but without waiting for I/O (for synchronous stats); the shared
        index answers with the shared count it last saw and refreshes it in the background."""
        ...

    async def clear(self, tenant: str | None = None) -> None: ...

    async def local_only(self, key: str) -> bool:
        """Is ``key`` recorded only locally (its entry must then stay out of shared tiers)?"""
        ...

    async def take_local_only(self) -> list[str]:
        """Once the shared index is reachable: the local-only keys, forgotten here; drop their entries."""
        ...

    async def close(self) -> None: ...


def dense_hits(keys: list[str], qvecs: Vectors, cutoffs: np.ndarray, vectors: Vectors) -> set[str]:
    """The keys whose cached query is at least its cutoff close to one of ``vectors``."""
    if not keys:
        return set()
    best = (qvecs @ vectors.T).max(axis=1)
    return {keys[i] for i in np.nonzero(best >= cutoffs - EPS)[0]}


def dense_matrix(recs: Iterable[DepRecord], dim: int) -> tuple[list[str], Vectors, np.ndarray]:
    """Keys, stacked query vectors and dense cutoffs (-inf for None) of the records of dimension ``dim``
    (a record of another dimension belongs to another embedder, whose keys this one never serves)."""
    keys: list[str] = []
    vecs: list[Vectors] = []
    cut: list[float] = []
    for rec in recs:
        if rec.qvec.shape != (dim,):
            continue
        keys.append(rec.entry_key)
        vecs.append(rec.qvec)
        cut.append(-np.inf if rec.dense_cutoff is None else rec.dense_cutoff)
    return (keys, np.stack(vecs) if vecs else np.zeros((0, dim), np.float32), np.asarray(cut, dtype=np.float32))


class DenseRows:
    """The query vectors and dense cutoffs of one tenant's records, kept in step with every add and
    remove (a row is written or swap-removed), so a change's dense check is one matrix product and
    never a re-read of every record: at 100k cached entries re-reading them costs seconds."""

    def __init__(self, recs: Iterable[DepRecord], dim: int) -> None:
        keys, vecs, cut = dense_matrix(recs, dim)
        self.dim = dim
        self.keys = keys
        self.pos = {k: i for i, k in enumerate(keys)}
        self.vecs = vecs if len(keys) else np.zeros((16, dim), np.float32)
        self.cut = cut if len(keys) else np.zeros(16, np.float32)
        self.ver = 0
        """The dependency index's change counter this matrix reflects (the SQLite index's ``dense_log``)."""

    def upsert(self, rec: DepRecord) -> None:
        if rec.qvec.shape != (self.dim,):
            return  # another embedder's record: never served by this one's keys
        i = self.pos.get(rec.entry_key)
        if i is None:
            i = len(self.keys)
            if i == len(self.vecs):  # grow by doubling: amortised O(1) per add
                self.vecs = np.concatenate([self.vecs, np.zeros_like(self.vecs)])
                self.cut = np.concatenate([self.cut, np.zeros_like(self.cut)])
            self.keys.append(rec.entry_key)
            self.pos[rec.entry_key] = i
        self.vecs[i] = rec.qvec
        self.cut[i] = -np.inf if rec.dense_cutoff is None else rec.dense_cutoff

    def remove(self, keys: Iterable[str]) -> None:
        for key in keys:
            i = self.pos.pop(key, None)
            if i is None:
                continue
            last = len(self.keys) - 1
            if i != last:  # move the last row into the hole
                moved = self.keys[last]
                self.keys[i] = moved
                self.pos[moved] = i
                self.vecs[i] = self.vecs[last]
                self.cut[i] = self.cut[last]
            self.keys.pop()

    def entered(self, vectors: Vectors) -> set[str]:
        n = len(self.keys)
        return dense_hits(self.keys, self.vecs[:n], self.cut[:n], vectors) if n else set()


def batched(items: list[str], n: int) -> Iterable[list[str]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]
