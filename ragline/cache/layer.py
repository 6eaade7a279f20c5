"""CacheLayer: what the pipeline asks of the cache (DESIGN.md §2–3).

It owns the key scheme for each kind (answer, retrieval, embedding, llm), the
tiers, the dependency index, the semantic index and single-flight, and turns
ingestion changes into exact invalidations:

* removed or replaced chunks → every entry that had one of them among its
  candidates is re-checked (dropped outright if the chunk was in its context);
* new chunks → entries whose dense list they would enter (cosine ≥ cutoff) are
  re-checked;
* added or removed chunks → entries whose query shares a keyword term with them
  are re-checked: such a change moves that term's document frequency, hence its
  BM25 idf, and can reorder the entry's keyword candidates even when no new
  chunk enters them (the churn benchmark caught one such stale hit when only
  chunks able to enter were re-checked);
* "re-checked" means retrieval is re-run from the stored query vector (no
  embedding, a few ms) and the entry is kept only if its context chunk ids
  are unchanged — so invalidation is exact for what is served, and everything
  else stays cached.

Dropped keys are deleted from every tier and published on Redis so other
instances drop them from L1.

With a shared L2 the dependency records live in Redis too
(:class:`~ragline.cache.deps_redis.RedisDependencyIndex`), so an ingest on any
instance finds the entries every instance wrote.  If that index cannot be
reached, the layer errs towards dropping more (see the deps module): entries
whose record could only be kept locally stay out of the shared tiers and are
dropped once Redis is back, and an invalidation that could not consult the
shared records drops every answer and retrieval entry of the tenant.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from ragline.cache.behind import WriteBehind
from ragline.cache.clock import TermClock
from ragline.cache.crypto import cipher_from
from ragline.cache.deps import DepRecord, DepsIndex
from ragline.cache.deps_redis import RedisDependencyIndex
from ragline.cache.deps_sqlite import DependencyIndex
from ragline.cache.keys import KINDS, kind_of, kind_prefix, tenant_prefix
from ragline.cache.layer_keys import LayerKeys
from ragline.cache.marks import MARK, STAMP, STAMP_LEN, new_token, stamped, unmarked
from ragline.cache.redis import RedisTier
from ragline.cache.semantic import SemanticIndex
from ragline.cache.semantic_match import load_semantic, semantic_from_peer, semantic_match
from ragline.cache.singleflight import DistributedSingleFlight
from ragline.cache.tiered import TieredCache, build_cache
from ragline.config import Settings
from ragline.types import Vectors

T = TypeVar("T")


COUNTERS: tuple[str, ...] = (
    "semantic_hits",
    "semantic_rejected_guard",
    "semantic_rejected_verify",
    "llm_calls_saved",
    "llm_tokens_saved",
    "invalidation_checked",
    "invalidation_dropped",
    "invalidation_kept",
    "invalidation_marked",
    "reverify_on_read",
    "reverify_kept",
    "reverify_dropped",
    "clock_recorded",
    "clock_checked",
    "clock_unaffected",
    "clock_gone",
)
"""What ``stats()["counters"]`` reports (every one present, from 0)."""


def _deps_index(settings: Settings) -> DepsIndex:
    """Shared through Redis when L2 is (every instance must see every record), else SQLite; records
    sealed with encryption at rest (they hold the query text: :mod:`ragline.cache.crypto`)."""
    cs = settings.cache
    path = settings.data_dir / "cache" / "deps.sqlite3"
    cipher = cipher_from(cs)
    if not (cs.enabled and cs.l2_enabled and cs.redis_url):
        return DependencyIndex(path, cipher)
    # off the hot path, so a longer timeout than L2's
    return RedisDependencyIndex(
        cs.redis_url,
        path,
        timeout_s=max(1.0, cs.redis_timeout_s),
        connect_timeout_s=cs.redis_connect_timeout_s,
        max_connections=min(16, cs.redis_max_connections),
        reset_s=cs.breaker_reset_s,
        ttl_grace_s=min(300.0, cs.ttl_s),
        cipher=cipher,
    )


@dataclass(slots=True)
class InvalidationReport:
    checked: int = 0
    marked: int = 0
    dropped: int = 0
    kept: int = 0
    causes: dict[str, int] = field(default_factory=dict)


class CacheLayer(LayerKeys):
    def __init__(self, settings: Settings, dim: int, embedder_id: str, llm_id: str, *, prompt_version: str) -> None:
        """``prompt_version`` names the prompt template: part of every answer key (bump it, old answers go)."""
        self.settings = settings
        self.cs = settings.cache
        self.tiers: TieredCache = build_cache(self.cs, settings.data_dir)
        self.behind = WriteBehind()
        """Writes that only serve later requests run behind the response (:mod:`ragline.cache.behind`)."""
        self._tiers_get_l1 = self.tiers.get_l1  # bound once: the exact-hit path
        self.deps: DepsIndex = _deps_index(settings)
        self.shared_deps = isinstance(self.deps, RedisDependencyIndex)
        """Records (and marks in L2) are shared with other instances: their changes are theirs to mark."""
        self.clock: TermClock | None = None
        """With a clock, answer and retrieval values are stamped (:mod:`ragline.cache.clock`)."""
        self._clock_now: dict[str, int] | None = None
        self._reconcile_task: asyncio.Task[None] | None = None
        self.semantic = SemanticIndex(dim)
        self.embedder_id = embedder_id
        self.llm_id = llm_id
        # Everything that changes an answer, hashed once: per-request keys hash only the query part.
        self.fingerprint = f"{settings.fingerprint()}:{embedder_id}:{llm_id}:{prompt_version}"
        redis = next((t for t in self.tiers.tiers if isinstance(t, RedisTier)), None)
        self.flight: DistributedSingleFlight[Any] = DistributedSingleFlight(
            redis,
            lock_s=self.cs.singleflight_lock_s,
            wait_s=self.cs.singleflight_wait_s,
            poll_s=self.cs.singleflight_poll_s,
        )
        self.ttls: dict[str, float] = {kind: self.cs.ttl_for(kind) for kind in KINDS}  # a write: its kind's
        self.ttl = max(self.ttls["answer"], self.ttls["retrieval"])  # dependency records: the longer of the two
        self._answer_keys: dict[tuple[str, str, int], str] = {}
        """(tenant, raw query, k) → answer key of history-less requests (keys are pure functions of these)."""
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.tiers.on_added = self._semantic_from_peer

    def attach_clock(self, clock: TermClock) -> bool:
        """Check keyword changes at read time against the store's term clock, where that is exact:
        lazy invalidation with this machine's dependency index (the Redis-shared index still marks
        at change time: docs/NOTES.md).  Returns whether the clock is used."""
        if self.cs.invalidation != "lazy" or isinstance(self.deps, RedisDependencyIndex):
            return False
        self.clock, self._clock_now = clock, clock.now
        return True

    async def start(self) -> None:
        await self.tiers.start()
        await self._load_semantic()
        if isinstance(self.deps, RedisDependencyIndex) and self._reconcile_task is None:
            self._reconcile_task = asyncio.create_task(self._reconcile_local_only(), name="ragline-deps-reconcile")

    async def _semantic_from_peer(self, keys: list[str], fingerprint: str) -> None:
        await semantic_from_peer(self, keys, fingerprint)

    async def _load_semantic(self) -> None:
        await load_semantic(self)

    async def _reconcile_local_only(self, interval_s: float = 1.0) -> None:
        """Entries cached while the shared dependency index was unreachable are known to no other
        instance, so no other instance's invalidation can name them: once Redis answers again,
        drop them everywhere (this also covers leftovers of a previous run in the local file)."""
        while True:
            if self.deps.has_local_only:
                with contextlib.suppress(Exception):  # fail open: try again next round
                    keys = await self.deps.take_local_only()
                    if keys:
                        await self.drop(keys)
            await asyncio.sleep(interval_s)

    async def close(self) -> None:
        await self.behind.drain()  # pending writes land before the tiers close
        if self._reconcile_task is not None:
            self._reconcile_task.cancel()
            with contextlib.suppress(BaseException):
                await self._reconcile_task
            self._reconcile_task = None
        await self.tiers.close()
        await self.deps.close()

    # -- keys -----------------------------------------------------------------
    def cacheable_llm(self, temperature: float) -> bool:
        return temperature == 0.0 or self.cs.cache_nonzero_temperature

    # -- read / write ----------------------------------------------------------
    def get_l1(self, key: str, tenant: str) -> bytes | None:
        """The hot path: an L1 value that needs no verification, as served (``None`` for a marked
        value, and with a term clock for one stamped before the tenant's last keyword change)."""
        body = self._tiers_get_l1(key)
        if not body:
            return None
        now = self._clock_now
        if now is None:  # MARK starts with a zero byte, which no answer or retrieval value (JSON) does
            return body if body[0] else None
        if body.startswith(STAMP) and int.from_bytes(body[4:STAMP_LEN], "big") >= now.get(tenant, 0):
            return body[STAMP_LEN:]
        return None

    def l1_to_verify(self, key: str, tenant: str) -> bytes | None:
        """The L1 value of ``key`` if :meth:`get_l1` would not serve it (not counted as a lookup)."""
        l1 = self.tiers.l1
        body = l1.get(key) if l1 is not None else None
        if body is None:
            return None
        if body.startswith(MARK) or (self._clock_now is not None and not self.fresh(body, tenant)):
            return body
        return None

    def fresh(self, body: bytes, tenant: str) -> bool:
        """Unmarked and, with a term clock, stamped at the tenant's current reading."""
        if body.startswith(MARK):
            return False
        now = self._clock_now
        if now is None:
            return True
        return body.startswith(STAMP) and int.from_bytes(body[4:STAMP_LEN], "big") >= now.get(tenant, 0)

    def reading(self, tenant: str) -> int:  # the tenant's term-clock reading (0 without a clock)
        return self._clock_now.get(tenant, 0) if self._clock_now is not None else 0

    async def get(self, key: str, skip_l1: bool = False) -> tuple[bytes | None, str | None]:
        """``(value, tier)``; the value may carry a mark (:mod:`ragline.cache.marks`): answer and
        retrieval readers go through :meth:`ragline.cache.invalidation.Invalidation.read`."""
        return await self.tiers.get_with_tier(key, skip_l1=skip_l1)

    async def put(
        self, key: str, value: bytes, dep: DepRecord | None = None, semantic: bool = False, stamp: int | None = None
    ) -> None:
        """Store an entry in every tier; with ``dep``, register it for invalidation first
        (so there is no window in which a cached entry is invisible to invalidation).  With a term
        clock, an entry with ``dep`` is stamped with ``stamp`` (the reading it was computed at)."""
        if dep is not None:
            if self._clock_now is not None:
                value = stamped(value, self.reading(dep.tenant) if stamp is None else stamp)
            shared = await self.deps.add(dep, time.time() + self.ttl_of(key))
            if semantic and self.cs.semantic:
                self.semantic.add(dep.tenant, self.fingerprint, key, dep.query, dep.qvec)
                if shared:
                    await self.tiers.announce([key], self.fingerprint)  # other instances index it too
            if not shared:
                await self._put_local_only(key, value)
                return
        await self.tiers.set_many({key: value}, self.ttl_of(key))

    def ttl_of(self, key: str) -> float:
        """The lifetime of ``key``'s kind (``cache.ttls``; ``cache.ttl_s`` for a key of no known kind)."""
        return self.ttls.get(kind_of(key), self.cs.ttl_s)

    async def _put_local_only(self, key: str, value: bytes) -> None:
        """The record reached only this instance's index: keep the entry out of shared tiers
        (no other instance could invalidate it there)."""
        local = [t for t in self.tiers.tiers if not t.shared]
        await asyncio.gather(*(t.set_many({key: value}, self.ttl_of(key)) for t in local), return_exceptions=True)
        # the reconciler may have taken the record meanwhile (Redis is back): then it may have
        # dropped the entry before it was written, so drop it here
        if not await self.deps.local_only(key):
            await asyncio.gather(*(t.delete_many([key]) for t in local), return_exceptions=True)

    # -- embeddings ----------------------------------------------------------------
    async def get_vectors(self, tenant: str, texts: Sequence[str], dim: int) -> dict[int, Vectors]:
        """Cached vectors by position in ``texts`` (misses are absent)."""
        keys = [self.embedding_key(tenant, t) for t in texts]
        found = await self.tiers.get_many(keys)
        return {
            i: np.frombuffer(found[k], dtype=np.float32)
            for i, k in enumerate(keys)
            if k in found and len(found[k]) == 4 * dim
        }

    async def put_vectors(self, tenant: str, texts: Sequence[str], vectors: Vectors) -> None:
        items = {
            self.embedding_key(tenant, t): np.ascontiguousarray(v, dtype=np.float32).tobytes()
            for t, v in zip(texts, vectors, strict=True)
        }
        # L1 now (the next lookup in this process hits); L2/L3 behind the response: a vector is a pure
        # function of (embedder, text), so a late or lost write costs at most one more embedding
        ttl = self.ttls["embedding"]
        await self.tiers.set_many(items, ttl, slow=False)
        await self.behind.submit(None, self.tiers.set_many(items, ttl, l1=False))

    # -- semantic -----------------------------------------------------------------------
    async def semantic_match(
        self, tenant: str, query: str, qvec: Vectors, context_ids: Sequence[str], exclude: str | None = None
    ) -> tuple[bytes, float, str] | None:
        """A cached answer for a *different* query that may serve this one (:mod:`ragline.cache.semantic_match`)."""
        return await semantic_match(self, tenant, query, qvec, context_ids, exclude)

    # -- invalidation ------------------------------------------------------------------
    async def mark(self, keys: Sequence[str]) -> bytes:
        """Mark entries for re-verification on their next read; returns the change's token."""
        token = new_token()
        await self.tiers.mark_many(list(keys), token)
        return token

    async def unmark(self, key: str, marked: bytes, reading: int) -> bool:
        """Clear the mark of ``key`` (and, with a term clock, restamp it with ``reading``, taken
        before its verification began) if it still holds exactly ``marked`` (no newer change marked it)."""
        clean = stamped(marked, reading) if self._clock_now is not None else unmarked(marked)
        return await self.tiers.replace(key, marked, clean)

    async def restamp_l1(self, key: str, body: bytes, reading: int) -> None:
        """An unmarked entry whose terms no change touched since its stamp: its L1 copy gets
        ``reading`` (compare-and-set, so a concurrent mark wins); the slower tiers keep their stamp
        (a read from them checks the terms again: cheap, and no write per read)."""
        l1 = self.tiers.l1
        if l1 is not None:
            await l1.replace(key, body, stamped(body, reading))

    async def flush_llm(self, tenant: str) -> int:
        """Drop a tenant's LLM responses (``invalidation: flush_all``, a baseline)."""
        return await self.tiers.clear(kind_prefix(tenant, "llm"))

    async def drop(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        self.semantic.remove(set(keys))
        await self.deps.remove(list(keys))
        await self.tiers.delete_many(list(keys))

    async def flush_results(self, tenant: str) -> int:
        """Drop every answer and retrieval entry of a tenant (embeddings and LLM responses stay)."""
        keys = await self.deps.tenant_keys(tenant)
        self.semantic.clear(tenant)
        await self.deps.clear(tenant)
        n = 0
        for kind in ("answer", "retrieval"):
            n += await self.tiers.clear(kind_prefix(tenant, kind))
        return max(n, len(keys))

    async def invalidate_tenant(self, tenant: str) -> int:
        keys = await self.deps.tenant_keys(tenant)
        self.semantic.clear(tenant)
        await self.deps.clear(tenant)
        n = await self.tiers.clear(tenant_prefix(tenant))
        return max(n, len(keys))

    async def invalidate_chunks(self, tenant: str, chunk_ids: Sequence[str]) -> int:
        failures = self.deps.lookup_failures
        keys = await self.deps.by_chunks(tenant, chunk_ids)
        await self.drop(sorted(keys))
        report = InvalidationReport()
        await self.flush_if_incomplete(tenant, failures, report)
        return len(keys) + report.dropped

    async def flush_if_incomplete(self, tenant: str, failures_before: int, report: InvalidationReport) -> None:
        """If a lookup could not consult the shared dependency records (Redis unreachable), entries
        other instances wrote may depend on this change unseen: drop every answer and retrieval
        entry of the tenant instead — in L1/L3 now, in L2 when RedisTier replays the remembered
        prefix delete on recovery, on other instances through the (retried) bus event."""
        if self.deps.lookup_failures == failures_before:
            return
        self.semantic.clear(tenant)
        n = 0
        for kind in ("answer", "retrieval"):
            n += await self.tiers.clear(kind_prefix(tenant, kind))
        report.dropped += n
        report.causes["deps_unavailable"] = report.causes.get("deps_unavailable", 0) + n

    async def invalidate_all(self) -> int:
        self.semantic.clear()
        n = await self.deps.count()
        await self.deps.clear()
        return max(n, await self.tiers.clear(None))

    async def invalidate(
        self,
        *,
        tenant: str | None = None,
        chunk_ids: Sequence[str] | None = None,
        key: str | None = None,
        everything: bool = False,
    ) -> int:
        """Manual invalidation: everything, one key, one tenant, or the entries using some chunks
        of a tenant.  Returns how many entries went."""
        if everything:
            return await self.invalidate_all()
        if key is not None:
            await self.drop([key])
            return 1
        assert tenant is not None
        if chunk_ids is not None:
            return await self.invalidate_chunks(tenant, chunk_ids)
        return await self.invalidate_tenant(tenant)

    # -- single-flight, counters, operations ------------------------------------------
    async def single_flight(
        self, key: str, compute: Callable[[], Awaitable[T]], poll: Callable[[], Awaitable[T | None]]
    ) -> T:
        """``compute()`` once for every concurrent caller of ``key``, here and on other instances
        (which wait for the value through ``poll``); see :mod:`ragline.cache.singleflight`."""
        result: T = await self.flight.do(key, compute, poll)
        return result

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to one of the counters ``stats()`` reports."""
        self.counters[name] = self.counters.get(name, 0) + n

    def counter(self, name: str) -> int:
        return self.counters.get(name, 0)

    def health(self) -> dict[str, bool]:
        """Per tier: is it serving (False: degraded, the layer fails open to the other tiers)."""
        return self.tiers.health()

    def flush_metrics(self) -> None:
        """Publish the tiers' hit/miss counts to Prometheus (called before a scrape)."""
        self.tiers.flush_metrics()

    def stats(self) -> dict[str, Any]:
        return {
            "tiers": self.tiers.stats(),
            "dependency_records": self.deps.known_count(),
            "semantic_entries": len(self.semantic),
            "counters": dict(self.counters),
            "singleflight": {
                "computed": self.flight.computed,
                "waited": self.flight.waited,
                "lockless": self.flight.lockless,
                "timeouts": self.flight.timeouts,
                "leases_lost": self.flight.lost,
            },
        }
