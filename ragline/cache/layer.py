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
(:class:`~ragline.cache.deps.RedisDependencyIndex`), so an ingest on any
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
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from ragline.cache import guards
from ragline.cache.deps import DependencyIndex, DepRecord, DepsIndex, RedisDependencyIndex
from ragline.cache.keys import canonical_query, kind_prefix, make_key_for, tenant_prefix
from ragline.cache.semantic import SemanticIndex
from ragline.cache.singleflight import DistributedSingleFlight
from ragline.cache.tiers import RedisTier, TieredCache, build_cache
from ragline.config import Settings
from ragline.context import same_evidence
from ragline.embed.base import Vectors
from ragline.llm.prompt import PROMPT_VERSION

Reverify = Callable[[DepRecord], Awaitable[DepRecord | None]]
"""Re-run retrieval for a cached entry; the refreshed record, or None if its context changed."""


@dataclass(slots=True)
class InvalidationReport:
    checked: int = 0
    dropped: int = 0
    kept: int = 0
    causes: dict[str, int] = field(default_factory=dict)


class CacheLayer:
    def __init__(self, settings: Settings, dim: int, embedder_id: str, llm_id: str) -> None:
        self.settings = settings
        self.cs = settings.cache
        self.tiers: TieredCache = build_cache(self.cs, settings.data_dir)
        deps_path = settings.data_dir / "cache" / "deps.sqlite3"
        self.deps: DepsIndex
        if self.cs.enabled and self.cs.l2_enabled and self.cs.redis_url:
            # shared by every instance; off the hot path, so a longer timeout than L2's
            self.deps = RedisDependencyIndex(
                self.cs.redis_url, deps_path, timeout_s=max(1.0, self.cs.redis_timeout_s),
                connect_timeout_s=self.cs.redis_connect_timeout_s,
                max_connections=min(16, self.cs.redis_max_connections), reset_s=self.cs.breaker_reset_s,
                ttl_grace_s=min(300.0, self.cs.ttl_s))
        else:
            self.deps = DependencyIndex(deps_path)
        self._reconcile_task: asyncio.Task[None] | None = None
        self.semantic = SemanticIndex(dim)
        self.embedder_id = embedder_id
        self.llm_id = llm_id
        # Everything that changes an answer, hashed once: per-request keys hash only the query part.
        self.fingerprint = f"{settings.fingerprint()}:{embedder_id}:{llm_id}:{PROMPT_VERSION}"
        redis = next((t for t in self.tiers.tiers if isinstance(t, RedisTier)), None)
        self.flight: DistributedSingleFlight[Any] = DistributedSingleFlight(
            redis, lock_s=self.cs.singleflight_lock_s, wait_s=self.cs.singleflight_wait_s,
            poll_s=self.cs.singleflight_poll_s)
        self.ttl = self.cs.ttl_s
        self.counters: dict[str, int] = {"semantic_hits": 0, "semantic_rejected_guard": 0,
                                         "semantic_rejected_verify": 0, "llm_calls_saved": 0,
                                         "llm_tokens_saved": 0, "invalidation_checked": 0,
                                         "invalidation_dropped": 0, "invalidation_kept": 0}

    async def start(self) -> None:
        await self.tiers.start()
        await asyncio.to_thread(self._load_semantic)
        if isinstance(self.deps, RedisDependencyIndex) and self._reconcile_task is None:
            self._reconcile_task = asyncio.create_task(self._reconcile_local_only(),
                                                       name="ragline-deps-reconcile")

    def _load_semantic(self) -> None:
        """Rebuild the in-process semantic index from the persistent dependency records."""
        by_tenant: dict[str, list[str]] = {}
        for key in self.deps.all_keys():
            if ":answer:" in key:
                by_tenant.setdefault(key.split(":")[2], []).append(key)
        for tenant, keys in by_tenant.items():  # one batched fetch per tenant (a round trip with Redis)
            for rec in self.deps.records(tenant, keys):
                self.semantic.add(tenant, self.fingerprint, rec.entry_key, rec.query, rec.qvec)

    async def _reconcile_local_only(self, interval_s: float = 1.0) -> None:
        """Entries cached while the shared dependency index was unreachable are known to no other
        instance, so no other instance's invalidation can name them: once Redis answers again,
        drop them everywhere (this also covers leftovers of a previous run in the local file)."""
        while True:
            if self.deps.has_local_only:
                with contextlib.suppress(Exception):  # fail open: try again next round
                    keys = await asyncio.to_thread(self.deps.take_local_only)
                    if keys:
                        await self.drop(keys)
            await asyncio.sleep(interval_s)

    async def close(self) -> None:
        if self._reconcile_task is not None:
            self._reconcile_task.cancel()
            with contextlib.suppress(BaseException):
                await self._reconcile_task
            self._reconcile_task = None
        await self.tiers.close()
        await asyncio.to_thread(self.deps.close)

    # -- keys -----------------------------------------------------------------
    def answer_key(self, tenant: str, query: str, k: int, history: Sequence[dict[str, str]]) -> str:
        material: dict[str, Any] = {"q": canonical_query(query), "k": k, "fp": self.fingerprint}
        if history:
            material["h"] = [[m["role"], m["content"]] for m in history]
        return make_key_for(tenant, "answer", material)

    def retrieval_key(self, tenant: str, query: str, k: int, mmr: bool, doc_level: bool,
                      candidates: int | None) -> str:
        return make_key_for(tenant, "retrieval", {"q": canonical_query(query), "k": k, "m": mmr,
                                                  "d": doc_level, "c": candidates, "fp": self.fingerprint})

    def embedding_key(self, tenant: str, text: str) -> str:
        return make_key_for(tenant, "embedding", {"e": self.embedder_id, "t": text})

    def llm_key(self, tenant: str, params: dict[str, Any], messages: list[dict[str, str]]) -> str:
        return make_key_for(tenant, "llm", {"llm": self.llm_id, "p": params, "m": messages})

    def cacheable_llm(self, temperature: float) -> bool:
        return temperature == 0.0 or self.cs.cache_nonzero_temperature

    # -- read / write ----------------------------------------------------------
    def get_l1(self, key: str) -> bytes | None:
        return self.tiers.get_l1(key)

    async def get(self, key: str, skip_l1: bool = False) -> tuple[bytes | None, str | None]:
        return await self.tiers.get_with_tier(key, skip_l1=skip_l1)

    async def put(self, key: str, value: bytes, dep: DepRecord | None = None, semantic: bool = False) -> None:
        """Store an entry in every tier; with ``dep``, register it for invalidation first
        (so there is no window in which a cached entry is invisible to invalidation)."""
        if dep is not None:
            shared = await asyncio.to_thread(self.deps.add, dep, time.time() + self.ttl)
            if semantic and self.cs.semantic:
                self.semantic.add(dep.tenant, self.fingerprint, key, dep.query, dep.qvec)
            if not shared:
                await self._put_local_only(key, value)
                return
        await self.tiers.set_many({key: value}, self.ttl)

    async def _put_local_only(self, key: str, value: bytes) -> None:
        """The record reached only this instance's index: keep the entry out of shared tiers
        (no other instance could invalidate it there)."""
        local = [t for t in self.tiers.tiers if not t.shared]
        await asyncio.gather(*(t.set_many({key: value}, self.ttl) for t in local), return_exceptions=True)
        # the reconciler may have taken the record meanwhile (Redis is back): then it may have
        # dropped the entry before it was written, so drop it here
        if not await asyncio.to_thread(self.deps.local_only, key):
            await asyncio.gather(*(t.delete_many([key]) for t in local), return_exceptions=True)

    # -- embeddings ----------------------------------------------------------------
    async def get_vectors(self, tenant: str, texts: Sequence[str], dim: int) -> dict[int, Vectors]:
        """Cached vectors by position in ``texts`` (misses are absent)."""
        keys = [self.embedding_key(tenant, t) for t in texts]
        found = await self.tiers.get_many(keys)
        return {i: np.frombuffer(found[k], dtype=np.float32) for i, k in enumerate(keys)
                if k in found and len(found[k]) == 4 * dim}

    async def put_vectors(self, tenant: str, texts: Sequence[str], vectors: Vectors) -> None:
        items = {self.embedding_key(tenant, t): np.ascontiguousarray(v, dtype=np.float32).tobytes()
                 for t, v in zip(texts, vectors, strict=True)}
        await self.tiers.set_many(items, self.ttl)

    # -- semantic -----------------------------------------------------------------------
    async def semantic_match(self, tenant: str, query: str, qvec: Vectors, context_ids: Sequence[str],
                             exclude: str | None = None) -> tuple[bytes, float, str] | None:
        """A cached answer for a *different* query that may serve this one, or None.

        Candidates come from the ANN index (cos ≥ τ); each must pass the guards,
        then retrieval verification: its context must hold the same chunks as this
        query's freshly retrieved one (:func:`~ragline.context.same_evidence`).
        Returns (stored body, similarity, matched query).
        """
        if not self.cs.semantic:
            return None
        cands = self.semantic.candidates(tenant, self.fingerprint, qvec, self.cs.semantic_threshold)
        if not cands:
            return None
        feats = guards.extract_features(query)
        for c in cands:
            if c.answer_key == exclude:
                continue
            if self.cs.semantic_guards:
                ok, _ = guards.guards_pass(feats, guards.extract_features(c.query), self.cs.semantic_guard_checks)
                if not ok:
                    self.counters["semantic_rejected_guard"] += 1
                    continue
            body, _tier = await self.get(c.answer_key)
            if body is None:
                self.semantic.remove([c.answer_key])
                continue
            if self.cs.semantic_verify_retrieval:
                cached_ctx = [s["chunk_id"] for s in orjson.loads(body)["sources"]]
                if not same_evidence(cached_ctx, context_ids):
                    self.counters["semantic_rejected_verify"] += 1
                    continue
            self.counters["semantic_hits"] += 1
            return body, c.similarity, c.query
        return None

    # -- invalidation ------------------------------------------------------------------
    async def on_change(self, tenant: str, removed_ids: Iterable[str], new_vectors: Vectors | None,
                        changed_terms: set[str], reverify: Reverify) -> InvalidationReport:
        """Apply one ingest/delete to the cache: drop exactly the entries whose context changed.

        ``changed_terms``: the keyword terms of every added and removed chunk.
        """
        report = InvalidationReport()
        removed = set(removed_ids)
        failures = self.deps.lookup_failures
        by_chunk = await asyncio.to_thread(self.deps.by_chunks, tenant, removed) if removed else set()
        dense = (await asyncio.to_thread(self.deps.dense_entered, tenant, new_vectors)
                 if new_vectors is not None and len(new_vectors) else set())
        by_term = await asyncio.to_thread(self.deps.by_terms, tenant, changed_terms) if changed_terms else set()
        by_term -= by_chunk | dense
        affected = by_chunk | dense | by_term
        if not affected:
            await self._flush_if_incomplete(tenant, failures, report)
            return report
        records = await asyncio.to_thread(self.deps.records, tenant, affected)
        drop: list[str] = []
        refreshed: list[DepRecord] = []
        for rec in records:
            report.checked += 1
            if removed.intersection(rec.context_ids):
                cause = "deleted_context"
            else:
                new = await reverify(rec)
                if new is not None:
                    refreshed.append(new)
                    report.kept += 1
                    continue
                cause = "removed_candidate" if rec.entry_key in by_chunk else (
                    "dense_entry" if rec.entry_key in dense else "keyword_entry")
            drop.append(rec.entry_key)
            drop.extend(rec.extra_keys)
            report.causes[cause] = report.causes.get(cause, 0) + 1
        for rec in refreshed:
            if not await asyncio.to_thread(self.deps.add, rec, time.time() + self.ttl):
                # its new dependencies reached only this instance's index: other instances
                # could not invalidate it in the shared tier, so it goes
                drop.append(rec.entry_key)
                drop.extend(rec.extra_keys)
                report.kept -= 1
                report.causes["deps_unavailable"] = report.causes.get("deps_unavailable", 0) + 1
        await self.drop(drop)
        report.dropped = len(drop)
        await self._flush_if_incomplete(tenant, failures, report)
        self.counters["invalidation_checked"] += report.checked
        self.counters["invalidation_dropped"] += report.dropped
        self.counters["invalidation_kept"] += report.kept
        return report

    async def drop(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        self.semantic.remove(set(keys))
        await asyncio.to_thread(self.deps.remove, list(keys))
        await self.tiers.delete_many(list(keys))

    async def flush_results(self, tenant: str) -> int:
        """Drop every answer and retrieval entry of a tenant (embeddings and LLM responses stay)."""
        keys = await asyncio.to_thread(self.deps.tenant_keys, tenant)
        self.semantic.clear(tenant)
        await asyncio.to_thread(self.deps.clear, tenant)
        n = 0
        for kind in ("answer", "retrieval"):
            n += await self.tiers.clear(kind_prefix(tenant, kind))
        return max(n, len(keys))

    async def invalidate_tenant(self, tenant: str) -> int:
        keys = await asyncio.to_thread(self.deps.tenant_keys, tenant)
        self.semantic.clear(tenant)
        await asyncio.to_thread(self.deps.clear, tenant)
        n = await self.tiers.clear(tenant_prefix(tenant))
        return max(n, len(keys))

    async def invalidate_chunks(self, tenant: str, chunk_ids: Sequence[str]) -> int:
        failures = self.deps.lookup_failures
        keys = await asyncio.to_thread(self.deps.by_chunks, tenant, chunk_ids)
        await self.drop(sorted(keys))
        report = InvalidationReport()
        await self._flush_if_incomplete(tenant, failures, report)
        return len(keys) + report.dropped

    async def _flush_if_incomplete(self, tenant: str, failures_before: int, report: InvalidationReport) -> None:
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
        n = await asyncio.to_thread(self.deps.count)
        await asyncio.to_thread(self.deps.clear)
        return max(n, await self.tiers.clear(None))

    def stats(self) -> dict[str, Any]:
        return {"tiers": self.tiers.stats(), "dependency_records": self.deps.count(),
                "semantic_entries": len(self.semantic), "counters": dict(self.counters),
                "singleflight": {"computed": self.flight.computed, "waited": self.flight.waited,
                                 "lockless": self.flight.lockless}}
