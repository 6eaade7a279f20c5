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

Dense effects (a new chunk close enough to enter an entry's dense list) and removed candidates are
still found at change time through their precise indexes and marked; only the keyword side, whose
affected set is unbounded, moves to read time.

Readings are the store's change-log seqs (:mod:`ragline.store.changelog`), and the store writes
the clock's rows in each change's own transaction: every process serving one corpus (workers, a CLI
ingest, a restart reading its L3) agrees on every reading, and a stamp written by one is exact for
all.  The clock never goes back (a cache clear keeps it): a value stamped before a clear must never
look newer than the clock.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["TermClock"]


class TermClock:
    """Per tenant: a change counter (:attr:`now`) and, per keyword term, the last change that touched it."""

    __slots__ = ("_floor", "_terms", "now")

    def __init__(self, rows: Iterable[tuple[str, str, int]] = ()) -> None:
        self.now: dict[str, int] = {}
        """tenant → clock reading; the hot path reads it directly (absent: 0)."""
        self._terms: dict[str, dict[str, int]] = {}
        self._floor: dict[str, int] = {}
        """tenant → a reading before which nothing is known (every older stamp counts as touched)."""
        for tenant, term, seq in rows:
            if term:
                self._terms.setdefault(tenant, {})[term] = seq
            else:
                self.now[tenant] = max(self.now.get(tenant, 0), seq)

    def advance(self, tenant: str, terms: Iterable[str], seq: int) -> None:
        """Record change ``seq`` touching ``terms`` (``"*"``: every term, e.g. after a reload)."""
        table = self._terms.setdefault(tenant, {})
        for t in terms:
            if t == "*":
                self._floor[tenant] = max(self._floor.get(tenant, 0), seq)
            elif seq > table.get(t, 0):
                table[t] = seq
        if seq > self.now.get(tenant, 0):
            self.now[tenant] = seq

    def changed_since(self, tenant: str, terms: Iterable[str], stamp: int) -> bool:
        """Did a change after reading ``stamp`` touch one of ``terms``?"""
        if stamp >= self.now.get(tenant, 0):
            return False
        if stamp < self._floor.get(tenant, 0):
            return True
        table = self._terms.get(tenant)
        if not table:
            return False
        get = table.get
        return any(get(t, 0) > stamp for t in terms)

    def terms(self, tenant: str) -> int:
        """How many distinct terms of ``tenant`` the clock holds (stats)."""
        return len(self._terms.get(tenant, ()))
