"""The term clock: keyword invalidation in proportion to what is asked again (DESIGN.md §3.1).

An added or removed chunk moves the BM25 statistics of every term it contains, and so may reorder
the keyword candidates of every cached query that shares one of those terms. With ordinary words
("the", "of", "cell") that is nearly every cached entry, so marking each of them made a change cost
O(cached entries). Instead, per tenant, the clock counts changes and remembers, per keyword term,
the last change that touched it:

* a change advances the clock once and writes its terms: O(terms of the change), whatever the size
  of the cache;
* every answer and retrieval value is stamped with the clock reading at which it was computed or
  last verified (:func:`ragline.cache.marks.stamped`);
* a read whose stamp equals the clock serves at once (the exact-hit path compares two integers);
  an older stamp checks the entry's recorded terms: untouched since the stamp, the entry is served
  and restamped, touched, it is re-verified by retrieval like a marked entry.

The other two effects move to read time the same way: the clock keeps the recent changes of each
tenant (removed chunk ids, added chunk vectors, by seq), and a read older than the clock also asks
whether a chunk removed since its stamp was among the entry's candidates, and whether a chunk added
since would enter its dense list (one small matrix product against the entry's query vector, the
same cutoff test the change-time index used to run).  So a change costs O(its own size) whatever
the size of the cache, and the work lands only on entries that are asked again.  A stamp older
than the kept window (or than the process's start, for what it did not load) counts as touched.

Readings are the store's change-log seqs (:mod:`ragline.store.changelog`), and the store writes
the clock's rows in each change's own transaction: every process serving one corpus (workers, a CLI
ingest, a restart reading its L3) agrees on every reading, and a stamp written by one is exact for
all.  The clock never goes back (a cache clear keeps it): a value stamped before a clear must never
look newer than the clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

import numpy as np

from ragline.types import Change, Vectors

__all__ = ["GONE", "MOVED", "UNAFFECTED", "TermClock"]

MARGIN: Final = 4e-3
"""Vectors are kept in float16 (half the memory): a cosine from them may be off by ~1e-3, so a chunk
counts as entering a dense list when it comes within this much of the cutoff (more re-verification,
never less)."""
UNAFFECTED: Final = 0
MOVED: Final = 1
GONE: Final = 2
MAX_VECTORS: Final = 32768
"""Added-chunk vectors kept per tenant (24 MB at 384 dims in float16); beyond, the oldest half is
forgotten. A bulk ingest larger than this makes entries stamped before it count as touched."""


class _Recent:
    """One tenant's changes after ``floor``: when each removed chunk id went, and the vectors of the
    chunks added, in seq order."""

    __slots__ = ("floor", "n", "removed", "seqs", "vecs")

    def __init__(self, floor: int) -> None:
        self.floor = floor
        self.removed: dict[str, int] = {}
        self.seqs = np.zeros(0, np.int64)
        self.vecs: Vectors | None = None
        self.n = 0

    def add(self, seq: int, removed: Iterable[str], vectors: Vectors | None) -> None:
        for cid in removed:
            if seq > self.removed.get(cid, 0):
                self.removed[cid] = seq
        if vectors is None or not len(vectors):
            return
        vectors = np.asarray(vectors, np.float32)
        if self.vecs is None or self.vecs.shape[1] != vectors.shape[1]:
            self.vecs, self.seqs, self.n = np.zeros((64, vectors.shape[1]), np.float16), np.zeros(64, np.int64), 0
        need = self.n + len(vectors)
        if need > len(self.vecs):  # grow by doubling: amortised O(1) per vector
            size = max(need, 2 * len(self.vecs))
            self.vecs = np.concatenate([self.vecs, np.zeros((size - len(self.vecs), self.vecs.shape[1]), np.float16)])
            self.seqs = np.concatenate([self.seqs, np.zeros(size - len(self.seqs), np.int64)])
        self.vecs[self.n : need] = vectors.astype(np.float16)
        self.seqs[self.n : need] = seq
        self.n = need
        if self.n > MAX_VECTORS:
            self._forget(self.n // 2)

    def _forget(self, k: int) -> None:
        """Drop the oldest ``k`` vectors; everything up to their last seq becomes unknown."""
        assert self.vecs is not None
        self.floor = max(self.floor, int(self.seqs[:k].max()))
        rest = self.n - k
        self.vecs[:rest] = self.vecs[k : self.n]
        self.seqs[:rest] = self.seqs[k : self.n]
        self.n = rest
        self.removed = {c: q for c, q in self.removed.items() if q > self.floor}

    def entered(self, stamp: int, qvec: Vectors, cutoff: float | None) -> bool:
        """Would a chunk added after ``stamp`` enter a dense list with this query vector and cutoff?"""
        if self.vecs is None or self.n == 0:
            return False
        # a mask, not a binary search: changes may be recorded out of seq order
        after = np.nonzero(self.seqs[: self.n] > stamp)[0]
        if not len(after):
            return False
        if cutoff is None or qvec.shape != (self.vecs.shape[1],):
            return True  # a list that was not full takes any new chunk (another dimension: unknown)
        sims = self.vecs[after].astype(np.float32) @ np.asarray(qvec, np.float32)
        return bool(float(sims.max()) >= cutoff - MARGIN)


class TermClock:
    """Per tenant: a change counter (:attr:`now`), per keyword term the last change that touched it,
    and the recent changes' removed chunks and added vectors."""

    __slots__ = ("_floor", "_recent", "_terms", "now")

    def __init__(self, rows: Iterable[tuple[str, str, int]] = (), floor: int = 0) -> None:
        """``rows``: (tenant, term, seq) from the store (term ``""``: the tenant's last change);
        ``floor``: the seq after which :meth:`record` will be told every change (older stamps count
        as touched: their removed and added chunks are not known here)."""
        self.now: dict[str, int] = {}
        """tenant → clock reading; the hot path reads it directly (absent: 0)."""
        self._terms: dict[str, dict[str, int]] = {}
        self._floor = floor
        self._recent: dict[str, _Recent] = {}
        for tenant, term, seq in rows:
            if term:
                self._terms.setdefault(tenant, {})[term] = seq
            else:
                self.now[tenant] = max(self.now.get(tenant, 0), seq)

    def record(self, change: Change, vectors: Vectors | None) -> None:
        """One change; ``vectors`` are those of ``change.added`` (``"*"`` in ``removed``: everything
        changed, e.g. the store reloaded: every older stamp counts as touched)."""
        tenant, seq = change.tenant, change.seq
        recent = self._recent.get(tenant)
        if recent is None:
            recent = self._recent[tenant] = _Recent(self._floor)
        if "*" in change.removed:
            recent.floor = max(recent.floor, seq)
        else:
            recent.add(seq, change.removed, vectors)
        table = self._terms.setdefault(tenant, {})
        for t in change.terms:
            if seq > table.get(t, 0):
                table[t] = seq
        if seq > self.now.get(tenant, 0):
            self.now[tenant] = seq

    def affected(
        self,
        tenant: str,
        stamp: int,
        terms: Iterable[str],
        candidates: Sequence[str],
        context: Sequence[str],
        qvec: Vectors,
        dense_cutoff: float | None,
    ) -> int:
        """What a change after reading ``stamp`` may have done to an entry with these keyword terms,
        candidates, context, query vector and dense cutoff: :data:`UNAFFECTED` (serve it as it is),
        :data:`MOVED` (re-verify it) or :data:`GONE` (a chunk of its context was removed or
        rewritten: an updated chunk keeps its id, so only dropping the entry is exact)."""
        if stamp >= self.now.get(tenant, 0):
            return UNAFFECTED
        recent = self._recent.get(tenant)
        if stamp < (recent.floor if recent is not None else self._floor):
            return GONE  # what changed is not known here: its context may be among it
        if recent is not None and recent.removed:
            gone = recent.removed
            if any(gone.get(c, 0) > stamp for c in context):
                return GONE
            if any(gone.get(c, 0) > stamp for c in candidates):
                return MOVED
        table = self._terms.get(tenant)
        if table:
            get = table.get
            if any(get(t, 0) > stamp for t in terms):
                return MOVED
        if recent is not None and recent.entered(stamp, qvec, dense_cutoff):
            return MOVED
        return UNAFFECTED

    def terms(self, tenant: str) -> int:
        """How many distinct terms of ``tenant`` the clock holds (stats)."""
        return len(self._terms.get(tenant, ()))
