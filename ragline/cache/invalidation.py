"""What keeps cached results exact across corpus changes (DESIGN.md §3.1), on the pipeline's side.

* **Generation guard.**  Each tenant has a count of corpus changes.  A result
  is stored only if no change landed while it was computed (or while it was
  being stored, before its dependency record was visible to invalidation);
  otherwise it is not cached, or dropped again.
* **Dependency records.**  Every cached answer and retrieval result is stored
  with a :class:`~ragline.cache.deps.DepRecord`: its query vector and keyword
  terms, candidates, context and retriever cutoffs.
* **Re-verification.**  A change hands its removed chunk ids, new vectors and
  touched keyword terms to :meth:`Invalidation.apply`, which re-runs
  retrieval for each affected entry from its stored vector (:meth:`reverify`)
  and keeps the entry only if its evidence is unchanged.

Keyword terms come from the store's own analysis (``Store.analyze``), so a
store with another keyword index stays exact.  :class:`CachedRetriever` is the
retrieval cache (DESIGN.md §2 step 4) built on these three.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable

import numpy as np

from ragline import metrics
from ragline.cache.clock import GONE, UNAFFECTED
from ragline.cache.deps import DepRecord
from ragline.cache.eager import recheck
from ragline.cache.layer import CacheLayer, InvalidationReport
from ragline.cache.marks import is_marked, payload, stamp_of
from ragline.codec import retrieval_from_bytes, retrieval_to_bytes
from ragline.context import same_evidence
from ragline.retrieve import HybridRetriever
from ragline.types import CacheMode, Change, Hit, Retrieval, Vectors

_FRESH_S = 1.0
_FRESH_MAX = 256

Generation = tuple[int, int]
"""What :meth:`Invalidation.generation` returns: (this process's changes of a tenant, store version)."""

Pack = Callable[[str, str, list[Hit]], Awaitable[list[Hit]]]
"""(tenant, query, hits) → the answer context built from them, as a fresh request would."""


class Invalidation:
    def __init__(
        self,
        cache: CacheLayer,
        retriever: HybridRetriever,
        pack: Pack,
        analyze: Callable[[str], list[str]],
        *,
        mode: str = "lazy",
        version: Callable[[], int] = lambda: 0,
        synced: Callable[[], int] = lambda: 0,
    ) -> None:
        """``version`` and ``synced``: the store's (:meth:`~ragline.store.base.Store.version`, the one
        this process's indexes reflect), so no result computed across another process's change is cached."""
        self.cache = cache
        self._version = version
        self._synced = synced
        self.retriever = retriever
        self.pack = pack
        self.analyze = analyze
        self.mode = mode
        """``cache.invalidation``: lazy (mark, re-verify on read), eager, flush or flush_all."""
        self._generation: dict[str, int] = {}
        self._fresh: dict[tuple[str, str, int, bool, bool, int | None], tuple[Generation, float, Retrieval]] = {}

    # -- generation guard ------------------------------------------------------
    def generation(self, tenant: str) -> Generation:
        """Taken when a computation begins: this process's changes of ``tenant`` and the store
        version its indexes reflect."""
        return self._generation.get(tenant, 0), self._synced()

    def _unchanged(self, tenant: str, gen: Generation) -> bool:
        """No change of this process, and none published by any process, since ``gen`` was taken."""
        return self._generation.get(tenant, 0) == gen[0] and self._version() == gen[1]

    async def put(self, gen: Generation, key: str, value: bytes, dep: DepRecord | None, semantic: bool = False) -> None:
        """Cache a result computed at corpus generation ``gen`` — unless the corpus changed since."""
        tenant = dep.tenant if dep is not None else ""
        if not self._unchanged(tenant, gen):
            return
        # same generation: no change of this process since the computation began, so no clock
        # advance either (both move together in ``changed``): the reading now is the one it began at
        await self.cache.put(key, value, dep, semantic=semantic, stamp=self.cache.reading(tenant))
        if not self._unchanged(tenant, gen):
            await self.cache.drop([key])

    async def put_behind(
        self, gen: Generation, key: str, value: bytes, dep: DepRecord | None, semantic: bool = False
    ) -> None:
        """:meth:`put`, behind the response: a reader of ``key`` waits for it (:mod:`ragline.cache.behind`)."""
        await self.cache.behind.submit(key, self.put(gen, key, value, dep, semantic))

    # -- dependency records ------------------------------------------------------
    def record(
        self,
        key: str,
        tenant: str,
        query: str,
        qvec: Vectors,
        r: Retrieval,
        context_ids: list[str],
        k: int,
        mmr: bool,
        doc_level: bool = False,
        candidates: int | None = None,
    ) -> DepRecord:
        terms = tuple(sorted(set(self.analyze(query))))
        return DepRecord(
            key,
            tenant,
            query,
            np.asarray(qvec, np.float32),
            terms,
            r.candidate_ids,
            tuple(context_ids),
            r.dense_cutoff,
            r.keyword_cutoff,
            k,
            mmr,
            doc_level=doc_level,
            candidates=candidates,
        )

    # -- changes -------------------------------------------------------------------
    async def changed(self, change: Change, vectors: Vectors | None, *, foreign: bool = False) -> None:
        """Drop exactly the cached entries ``change`` could alter (DESIGN.md §3.1); ``vectors`` are
        those of ``change.added``, in order.

        ``foreign``: another process wrote the change (and invalidated in the tiers it shares with
        this one); it is applied here too, because this process's L1 holds copies the other cannot
        reach, and because a read here must not find an L3 entry the writer has not marked yet.
        Marks and drops are idempotent, so doing both is safe; eager re-checks are the writer's."""
        tenant = change.tenant
        self._generation[tenant] = self._generation.get(tenant, 0) + 1
        if "*" in change.removed:  # the store reloaded everything: nothing cached can be trusted
            if self.cache.clock is not None:
                self.cache.clock.record(change, None)  # and stamps from before it count as touched
            n = await self.cache.flush_results(tenant)
            metrics.INVALIDATIONS.labels("flush").inc(n)
            return
        if self.mode in ("flush", "flush_all"):
            n = await self.cache.flush_results(tenant)
            if self.mode == "flush_all":
                n += await self.cache.flush_llm(tenant)
            metrics.INVALIDATIONS.labels("flush").inc(n)
            return
        terms = set(change.terms)
        clock = self.cache.clock
        removed = list(change.removed)
        with metrics.stage("invalidate"):
            if clock is not None:
                # every effect is checked when an entry is read (ragline.cache.clock): O(change) here
                clock.record(change, vectors)
                self.cache.count("clock_recorded")
                return
            if foreign and self.cache.shared_deps:
                # the writer marked the shared tier; marking it again here would put a second token
                # on it that this instance's own copies no longer match: drop those copies instead
                by_chunk, dense, by_term = await self._affected(tenant, set(removed), vectors, terms)
                await self.cache.tiers.invalidate_local(sorted(by_chunk | dense | by_term))
                return
            if self.mode == "eager" and not foreign:
                report = await recheck(self, tenant, removed, vectors, terms)
            else:
                report = await self.mark(tenant, removed, vectors, terms)
        for cause, n in report.causes.items():
            metrics.INVALIDATIONS.labels(cause).inc(n)

    async def _affected(
        self, tenant: str, removed: set[str], new_vectors: Vectors | None, changed_terms: set[str]
    ) -> tuple[set[str], set[str], set[str]]:
        """Index lookups only: entries with a removed chunk among their candidates, entries whose dense
        list a new vector would enter, entries whose query shares a keyword term with the change."""
        deps = self.cache.deps
        by_chunk = await deps.by_chunks(tenant, removed) if removed else set()
        dense = await deps.dense_entered(tenant, new_vectors) if new_vectors is not None and len(new_vectors) else set()
        by_term = await deps.by_terms(tenant, changed_terms) if changed_terms else set()
        return by_chunk, dense - by_chunk, by_term - by_chunk - dense

    async def mark(
        self, tenant: str, removed_ids: Iterable[str], new_vectors: Vectors | None, changed_terms: set[str]
    ) -> InvalidationReport:
        """``lazy``: drop the entries whose context lost a chunk, mark every other affected entry.

        No retrieval runs here, so a change costs index lookups in proportion to the entries it
        touches, not retrievals in proportion to the cache; a marked entry is re-verified only if it
        is asked again (:meth:`read`).  Only the records of entries with a removed candidate are
        fetched (to see whether the chunk was in their context)."""
        cache = self.cache
        report = InvalidationReport()
        removed = set(removed_ids)
        failures = cache.deps.lookup_failures
        by_chunk, dense, by_term = await self._affected(tenant, removed, new_vectors, changed_terms)
        drop: list[str] = []
        marked = dense | by_term
        for rec in await cache.deps.records(tenant, by_chunk) if by_chunk else []:
            if removed.intersection(rec.context_ids):
                drop.append(rec.entry_key)
                drop.extend(rec.extra_keys)
                report.causes["deleted_context"] = report.causes.get("deleted_context", 0) + 1
            else:
                marked.add(rec.entry_key)
        if marked:
            await cache.mark(sorted(marked))
        await cache.drop(drop)
        report.dropped = len(drop)
        report.marked = len(marked)
        await cache.flush_if_incomplete(tenant, failures, report)
        cache.count("invalidation_marked", report.marked)
        cache.count("invalidation_dropped", report.dropped)
        metrics.CACHE_MARKED.inc(report.marked)
        return report

    async def read(self, key: str, tenant: str, skip_l1: bool = False) -> tuple[bytes | None, str | None]:
        """An answer or retrieval entry from the cache as served, verified first if a change may
        have moved its evidence (``skip_l1``: L1 was read already; only an L1 copy that needs
        verification is taken from there)."""
        cache = self.cache
        tier: str | None = "l1"
        if await cache.behind.wait(key):
            skip_l1 = False  # its pending write has just put it in L1
        if skip_l1:
            body = cache.l1_to_verify(key, tenant)
            if body is None:
                body, tier = await cache.get(key, skip_l1=True)
        else:
            body, tier = await cache.get(key)
        if body is None:
            return None, None
        if cache.fresh(body, tenant):
            return payload(body), tier
        clean = await self.verify(key, tenant, body)
        return (clean, tier) if clean is not None else (None, None)

    async def verify(self, key: str, tenant: str, body: bytes) -> bytes | None:
        """Serve ``body`` only once its evidence is known to be current.

        A marked entry is re-verified by retrieval.  An unmarked one stamped before the tenant's
        last change asks the clock first whether a change since could have moved it (its terms,
        candidates and dense cutoff against the changes' terms, removed and added chunks): no, it
        is served as is (its L1 copy restamped); yes, it is re-verified like a marked one."""
        cache = self.cache
        clock = cache.clock
        if clock is not None and not is_marked(body):
            reading = cache.reading(tenant)
            cache.count("clock_checked")
            recs = await cache.deps.records(tenant, [key])
            if not recs:  # no record: no change could ever find it, so it must not be served
                await cache.drop([key])
                return None
            rec = recs[0]
            verdict = clock.affected(
                tenant, stamp_of(body) or 0, rec.terms, rec.candidate_ids, rec.context_ids, rec.qvec, rec.dense_cutoff
            )
            if verdict == UNAFFECTED:
                cache.count("clock_unaffected")
                metrics.CACHE_REVERIFY.labels("unaffected").inc()
                await cache.restamp_l1(key, body, reading)
                return payload(body)
            if verdict == GONE:
                await cache.drop([key, *rec.extra_keys])
                cache.count("clock_gone")
                metrics.CACHE_REVERIFY.labels("dropped").inc()
                return None
            return await self.verify_marked(key, tenant, body, recs)
        return await self.verify_marked(key, tenant, body)

    async def verify_marked(
        self, key: str, tenant: str, marked: bytes, recs: list[DepRecord] | None = None
    ) -> bytes | None:
        """Re-verify an entry by retrieval from its stored query vector (no embedding, no LLM).

        Same evidence: the refreshed record is stored first (so a later change sees the new
        candidates), then the mark is cleared (and the value restamped with the clock reading
        taken before the retrieval) by compare-and-set, in every tier and so on every instance;
        the clean value is served.  Changed evidence: the entry is dropped everywhere.  A newer
        change that re-marked the entry meanwhile makes the compare-and-set fail: the value now
        in the cache is read once more (another caller may have cleared it)."""
        cache = self.cache
        t0 = time.perf_counter()
        for _attempt in range(2):
            cache.count("reverify_on_read")
            reading = cache.reading(tenant)
            if recs is None:
                recs = await cache.deps.records(tenant, [key])
            new = await self.reverify(recs[0]) if recs else None
            if new is not None and _moved(recs[0], new) and not await cache.deps.add(new, time.time() + cache.ttl):
                new = None  # its record reached only this instance: other instances could not guard it
            if new is None:
                await cache.drop([key, *(recs[0].extra_keys if recs else ())])
                cache.count("reverify_dropped")
                metrics.CACHE_REVERIFY.labels("dropped").inc()
                return None
            if await cache.unmark(key, marked, reading):
                cache.count("reverify_kept")
                metrics.CACHE_REVERIFY.labels("kept").inc()
                metrics.CACHE_REVERIFY_SECONDS.observe(time.perf_counter() - t0)
                return payload(marked)
            current, _ = await cache.get(key)
            if current is None or cache.fresh(current, tenant):
                return payload(current) if current is not None else None
            marked, recs = current, None
        return None

    async def fresh_retrieval(
        self,
        tenant: str,
        query: str,
        qvec: Vectors,
        k: int,
        mmr: bool,
        doc_level: bool,
        candidates: int | None,
        keep: bool = False,
    ) -> Retrieval:
        """Hybrid retrieval now, or the one a re-verification of this request just ran.

        A failed re-verification of an answer is followed at once by its retrieval entry's (marked by
        the same change) and then by the miss path: without this they would run the same retrieval
        three times. Only re-verifications (``keep``) hand a result on, only within one corpus
        generation of this process and for ``_FRESH_S`` seconds, and each hand-on is used once."""
        memo = (tenant, query, k, mmr, doc_level, candidates)
        held = self._fresh.pop(memo, None)
        gen = self.generation(tenant)
        if held is not None and held[0] == gen and time.monotonic() - held[1] < _FRESH_S:
            r = held[2]
        else:
            r = await self.retriever.retrieve(
                tenant, query, qvec, k, use_mmr=mmr, doc_level=doc_level, candidates=candidates
            )
        if keep:
            self._fresh[memo] = (gen, time.monotonic(), r)
            while len(self._fresh) > _FRESH_MAX:
                self._fresh.pop(next(iter(self._fresh)))
        return r

    async def reverify(self, rec: DepRecord) -> DepRecord | None:
        """Re-run retrieval for a cached entry from its stored vector; None if its context changed."""
        r = await self.fresh_retrieval(
            rec.tenant, rec.query, rec.qvec, rec.k, rec.mmr, rec.doc_level, rec.candidates, keep=True
        )
        if ":answer:" in rec.entry_key:
            sources = await self.pack(rec.tenant, rec.query, r.hits)
            if not same_evidence((h.chunk_id for h in sources), rec.context_ids):
                return None
            ctx = rec.context_ids  # compared as a set from now on; the stored body is unchanged
        else:
            ctx = tuple(h.chunk_id for h in r.hits)
            if ctx != rec.context_ids:
                return None
        return DepRecord(
            rec.entry_key,
            rec.tenant,
            rec.query,
            rec.qvec,
            rec.terms,
            r.candidate_ids,
            ctx,
            r.dense_cutoff,
            r.keyword_cutoff,
            rec.k,
            rec.mmr,
            rec.extra_keys,
            rec.doc_level,
            rec.candidates,
        )


class CachedRetriever:
    """Hybrid retrieval behind the retrieval cache; a computed result is stored with its
    dependency record, under the generation guard.  Without a cache, plain retrieval."""

    def __init__(self, retriever: HybridRetriever, cache: CacheLayer | None, invalidation: Invalidation | None) -> None:
        self.retriever = retriever
        self.cache = cache
        self.invalidation = invalidation

    async def retrieve(
        self,
        tenant: str,
        query: str,
        qvec: Vectors | Callable[[], Awaitable[Vectors]],
        k: int,
        mmr: bool,
        doc_level: bool = False,
        candidates: int | None = None,
        mode: CacheMode = "default",
        timings: dict[str, float] | None = None,
        *,
        keep: bool = True,
    ) -> Retrieval:
        """``qvec`` may be a coroutine function: then the query is embedded only on a cache miss; ``keep``
        off: a fresh retrieval is not stored (``ask`` when it caches the answer, which supersedes the
        retrieval it was built from: storing both cost two dependency records per answer)."""
        cache = self.cache if mode != "bypass" else None
        key = cache.retrieval_key(tenant, query, k, mmr, doc_level, candidates) if cache is not None else None
        if cache is not None and key is not None and mode == "default":
            with metrics.stage("retrieval_cache", timings):
                inv = self.invalidation
                body, _ = await (inv.read(key, tenant) if inv is not None else cache.get(key))
            if body is not None:
                return retrieval_from_bytes(body)
        inv = self.invalidation
        gen = inv.generation(tenant) if inv is not None else (0, 0)
        vec = qvec if isinstance(qvec, np.ndarray) else await qvec()
        with metrics.stage("retrieve", timings):
            if inv is not None:  # right after a failed re-verification: its retrieval, not a second one
                r = await inv.fresh_retrieval(tenant, query, vec, k, mmr, doc_level, candidates)
            else:
                r = await self.retriever.retrieve(
                    tenant, query, vec, k, use_mmr=mmr, doc_level=doc_level, candidates=candidates
                )
        if key is not None and inv is not None and keep:
            dep = inv.record(key, tenant, query, vec, r, [h.chunk_id for h in r.hits], k, mmr, doc_level, candidates)
            await inv.put_behind(gen, key, retrieval_to_bytes(r), dep)  # serves later requests only
        return r


def _moved(old: DepRecord, new: DepRecord) -> bool:
    """Did re-verification change what a later change is checked against (candidates, cutoffs)?
    If not, the stored record stands and is not rewritten."""
    return (
        old.candidate_ids != new.candidate_ids
        or old.dense_cutoff != new.dense_cutoff
        or old.keyword_cutoff != new.keyword_cutoff
        or old.context_ids != new.context_ids
    )
