"""The tiers composed: L1 memory ─► L2 Redis ─► L3 disk (DESIGN.md §2–3).

* :class:`TieredCache` reads through the tiers (first hit wins, hits are
  promoted to faster tiers with their *remaining* TTL), writes to all, counts
  hits/misses per tier and kind, and applies remote invalidations received on
  the :class:`~ragline.cache.bus.InvalidationBus`.
* :func:`build_cache` assembles one from :class:`~ragline.config.CacheSettings`.

Concurrency model: every object here is used from one asyncio event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragline.cache import metrics as cache_metrics
from ragline.cache.bus import InvalidationBus
from ragline.cache.counts import DIGEST_SUFFIX, CountSources, key_prefix, merge_counts
from ragline.cache.crypto import cipher_from
from ragline.cache.disk import DiskTier
from ragline.cache.keys import KEY_ROOT
from ragline.cache.memory import MemoryTier
from ragline.cache.redis import RedisTier
from ragline.cache.tier import CacheTier, TTLTier

if TYPE_CHECKING:
    from ragline.config import CacheSettings

__all__ = ["TieredCache", "build_cache"]


class TieredCache:
    """L1 → L2 → L3 read-through cache with promotion, per-tier/kind counters and
    cross-instance invalidation.

    Typical use on the query path::

        raw = cache.get_l1(key)                      # sync, < 1 µs, no await
        if raw is None:
            raw, tier = await cache.get_with_tier(key, skip_l1=True)
        ...
        await cache.set_many({key: orjson.dumps(answer_dict)})

    Writes go to every tier; a hit in a slower tier is copied into the faster
    ones with its remaining TTL.  ``delete_many``/``clear`` act on every tier
    and, with a bus attached, tell the other instances to drop the keys from
    their *local* tiers (L1, L3) too.
    """

    def __init__(
        self,
        tiers: Sequence[CacheTier],
        *,
        default_ttl_s: float = 24 * 3600.0,
        bus: InvalidationBus | None = None,
        resync_clear_local: bool = True,
        metrics: bool = True,
    ) -> None:
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique: {names}")
        self.tiers: tuple[CacheTier, ...] = tuple(tiers)
        self.default_ttl_s = default_ttl_s
        self.bus = bus
        self.resync_clear_local = resync_clear_local
        first = self.tiers[0] if self.tiers else None
        self.l1: MemoryTier | None = first if isinstance(first, MemoryTier) else None
        self._l1_name = self.l1.name if self.l1 is not None else ""
        self._ttl_aware = tuple(isinstance(t, TTLTier) for t in self.tiers)
        # Request counters: plain ints keyed by the key prefix ``rl:v1:{tenant}:{kind}``,
        # turned into (tier, kind, tenant, result) metrics off the hot path.  L1 has one
        # dict per result, so get_l1 does one slice and one dict increment.
        self._l1_hits: dict[str, int] = {}
        self._l1_misses: dict[str, int] = {}
        self._counts: dict[tuple[str, str, str], int] = {}
        self._deletes = 0
        """Bumped by every delete/clear; a read that overlapped one does not promote."""
        self.count_sources: CountSources = (self._l1_name, self._l1_hits, self._l1_misses, self._counts)
        """What :func:`merge_counts` reads; holds no reference to the cache itself."""
        self._background: set[asyncio.Task[Any]] = set()
        self._metrics_task: asyncio.Task[None] | None = None
        self.metrics = metrics
        self.remote_invalidations = 0
        self.resyncs = 0
        self.on_added: Callable[[list[str], str], Awaitable[None]] | None = None  # set by the layer
        if metrics:
            cache_metrics.register(self)

    # -- reads -------------------------------------------------------------------------

    def get_l1(self, key: str) -> bytes | None:
        """Hot path: the L1 value or None, synchronously.  No hashing, no logging, no await."""
        l1 = self.l1
        if l1 is None:
            return None
        value = l1.get(key)
        d = self._l1_misses if value is None else self._l1_hits
        p = key[:-DIGEST_SUFFIX]
        d[p] = d.get(p, 0) + 1
        return value

    @property
    def counts(self) -> dict[tuple[str, str, str], int]:
        """``(tier, kind, "hit"|"miss") -> count`` over every tier (a fresh dict)."""
        return merge_counts(self.count_sources)

    async def get(self, key: str, *, skip_l1: bool = False) -> bytes | None:
        """The value from the fastest tier that has it, or None."""
        return (await self._lookup((key,), skip_l1)).get(key, (None, ""))[0]

    async def get_with_tier(self, key: str, *, skip_l1: bool = False) -> tuple[bytes | None, str | None]:
        """``(value, tier name)`` for ``CacheInfo.tier``; ``(None, None)`` on a miss."""
        hit = (await self._lookup((key,), skip_l1)).get(key)
        return (None, None) if hit is None else hit

    async def get_many(self, keys: Sequence[str], *, skip_l1: bool = False) -> dict[str, bytes]:
        """Read through every tier; one round trip per tier for all keys still missing."""
        return {k: v for k, (v, _) in (await self._lookup(keys, skip_l1)).items()}

    async def get_many_with_tier(self, keys: Sequence[str], *, skip_l1: bool = False) -> dict[str, tuple[bytes, str]]:
        """Like :meth:`get_many`, with the tier that answered each key."""
        return await self._lookup(keys, skip_l1)

    async def _lookup(self, keys: Sequence[str], skip_l1: bool) -> dict[str, tuple[bytes, str]]:
        found: dict[str, tuple[bytes, str]] = {}
        deletes_at_start = self._deletes
        missing: list[str] = list(dict.fromkeys(keys))
        counts = self._counts
        for i, tier in enumerate(self.tiers):
            if not missing:
                break
            if i == 0 and skip_l1 and tier is self.l1:
                continue
            if self._ttl_aware[i]:
                hits = await tier.get_many_ttl(missing)  # type: ignore[attr-defined]
            else:
                hits = {k: (v, None) for k, v in (await tier.get_many(missing)).items()}
            name = tier.name
            still: list[str] = []
            is_l1 = tier is self.l1
            for k in missing:
                p = key_prefix(k)
                if is_l1:
                    d = self._l1_hits if k in hits else self._l1_misses
                    d[p] = d.get(p, 0) + 1
                else:
                    ck = (name, p, "hit" if k in hits else "miss")
                    counts[ck] = counts.get(ck, 0) + 1
                if k not in hits:
                    still.append(k)
            if hits:
                for k, (v, _) in hits.items():
                    found[k] = (v, name)
                if i > 0 and self._deletes == deletes_at_start:
                    # never copy a value read before a delete finished back into a faster tier
                    self._promote(i, hits)
            missing = still
        return found

    def _promote(self, hit_index: int, hits: Mapping[str, tuple[bytes, float | None]]) -> None:
        """Copy hits into the faster tiers with their remaining TTL (never longer)."""
        by_ttl: dict[float, dict[str, bytes]] = {}
        for k, (v, remaining) in hits.items():
            ttl = self.default_ttl_s if remaining is None else min(remaining, self.default_ttl_s)
            if ttl > 0:
                by_ttl.setdefault(ttl, {})[k] = v
        l1 = self.l1
        for j in range(hit_index):
            tier = self.tiers[j]
            if tier is l1:  # synchronous: no task per promotion on the hot path
                assert l1 is not None
                for ttl, items in by_ttl.items():
                    for k, v in items.items():
                        l1.set(k, v, ttl)
            else:
                for ttl, items in by_ttl.items():
                    self._spawn(tier.set_many(items, ttl))

    def _spawn(self, coro: Awaitable[Any], limit: int = 1000) -> None:
        """Fire-and-forget a write to a slower tier, bounded; dropped under overload."""
        if len(self._background) >= limit:
            if asyncio.iscoroutine(coro):
                coro.close()
            return
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- writes ------------------------------------------------------------------------

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        await self.set_many({key: value}, ttl)

    async def set_many(
        self, items: Mapping[str, bytes], ttl: float | None = None, *, l1: bool = True, slow: bool = True
    ) -> None:
        """Write to every tier (L1 synchronously, the others concurrently, all fail-open); ``l1``/``slow``: which."""
        ttl = self.default_ttl_s if ttl is None else ttl
        writes: list[Awaitable[None]] = []
        for tier in self.tiers if items else ():
            if tier is self.l1 and l1:
                for k, v in items.items():
                    tier.set(k, v, ttl)
            elif tier is not self.l1 and slow:
                writes.append(tier.set_many(items, ttl))
        if writes:
            await asyncio.gather(*writes, return_exceptions=True)

    async def delete_many(self, keys: Sequence[str], *, broadcast: bool = True) -> None:
        """Delete from every tier; with a bus, other instances drop them from L1/L3."""
        if not keys:
            return
        self._deletes += 1
        # slowest tier first, L1 last: a concurrent read can then only find the old value in
        # a tier not yet cleared, and the promotion guard keeps it from being copied back
        for tier in reversed(self.tiers):
            with contextlib.suppress(Exception):
                await tier.delete_many(keys)
        if broadcast and self.bus is not None:
            await self.bus.publish(keys=list(keys))

    async def mark_many(self, keys: Sequence[str], token: bytes) -> None:
        """Mark ``keys`` in every tier (:mod:`ragline.cache.marks`); with a bus, other instances
        drop their local copies, so their next read finds the marked value in the shared tier."""
        if not keys:
            return
        self._deletes += 1  # a read that began before the mark must not promote an unmarked copy
        for tier in reversed(self.tiers):
            with contextlib.suppress(Exception):
                await tier.mark_many(keys, token)
        if self.bus is not None:
            await self.bus.publish(keys=list(keys))

    async def replace(self, key: str, expected: bytes, value: bytes) -> bool:
        """Compare-and-set: ``expected`` becomes ``value`` wherever it is still held.  The shared tier
        decides (it is the copy every instance reads): if it no longer holds ``expected`` (a newer
        change re-marked it), nothing local changes and the result is False.  Other instances drop
        their local copies, which may be the old marked ones."""
        shared = [t for t in self.tiers if t.shared]
        local = [t for t in reversed(self.tiers) if not t.shared]
        ok = False
        for tier in shared:
            try:
                ok = await tier.replace(key, expected, value)
            except Exception:
                ok = False
            if not ok:
                return False
        for tier in local:
            with contextlib.suppress(Exception):
                ok = await tier.replace(key, expected, value) or ok
        if shared and self.bus is not None:
            await self.bus.publish(keys=[key])
        return ok

    async def clear(self, prefix: str | None = None, *, broadcast: bool = True) -> int:
        """Clear ``prefix`` (e.g. ``keys.tenant_prefix(t)``) in every tier; returns the
        number of entries removed across tiers."""
        self._deletes += 1
        results: list[int | BaseException] = []
        for tier in reversed(self.tiers):
            try:
                results.append(await tier.clear(prefix))
            except Exception as exc:  # fail open
                results.append(exc)
        if broadcast and self.bus is not None:
            await self.bus.publish(prefix=KEY_ROOT if prefix is None else prefix)
        return sum(r for r in results if isinstance(r, int))

    # -- invalidation from other instances ---------------------------------------------

    async def invalidate_local(self, keys: Sequence[str] | None = None, prefix: str | None = None) -> None:
        """Drop keys / a prefix from the tiers this instance does not share (L1, L3)."""
        self._deletes += 1
        for tier in reversed(self.tiers):
            if tier.shared:
                continue
            try:
                if keys:
                    await tier.delete_many(keys)
                if prefix is not None:
                    await tier.clear(prefix)
            except Exception:  # fail open: a tier must not break the subscriber
                continue

    async def _on_remote(self, keys: list[str] | None, prefix: str | None) -> None:
        self.remote_invalidations += 1
        await self.invalidate_local(keys, prefix)

    async def announce(self, keys: Sequence[str], tag: str) -> None:  # answers others may index (on_added)
        if self.bus is not None:
            await self.bus.announce(keys, tag)

    async def _on_added(self, keys: list[str], tag: str) -> None:
        if self.on_added is not None:
            await self.on_added(keys, tag)

    async def _on_resync(self) -> None:
        """The bus (re)connected after a gap: events may have been missed, local copies are not trusted."""
        self.resyncs += 1
        if self.resync_clear_local:
            await self.invalidate_local(prefix=KEY_ROOT)

    # -- lifecycle and introspection ---------------------------------------------------

    async def start(self, metrics_interval_s: float = 1.0) -> None:
        """Start the invalidation subscriber (if a bus is attached) and the periodic
        metrics sync (if metrics are on).  Call once, in the app's event loop."""
        if self.bus is not None:
            self.bus.start(self._on_remote, self._on_resync, self._on_added)
        if self.metrics and (self._metrics_task is None or self._metrics_task.done()):
            self._metrics_task = asyncio.create_task(
                self._metrics_loop(metrics_interval_s), name="ragline-cache-metrics"
            )

    async def _metrics_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.flush_metrics()

    def flush_metrics(self) -> None:
        """Push the plain-int counters' deltas into the prometheus metrics now."""
        if self.metrics:
            with contextlib.suppress(Exception):  # metrics must never break the cache
                cache_metrics.sync(self)

    async def close(self) -> None:
        """Stop the subscriber, wait briefly for background writes, close every tier."""
        if self._metrics_task is not None:
            self._metrics_task.cancel()
            with contextlib.suppress(BaseException):
                await self._metrics_task
            self._metrics_task = None
        self.flush_metrics()
        if self.bus is not None:
            await self.bus.stop()
        if self._background:
            await asyncio.wait(list(self._background), timeout=1.0)
        for t in self.tiers:
            with contextlib.suppress(Exception):
                await t.close()

    def tier(self, name: str) -> CacheTier | None:
        for t in self.tiers:
            if t.name == name:
                return t
        return None

    @property
    def healthy(self) -> bool:
        """All tiers healthy (a False here is degraded service, never an error)."""
        return all(t.healthy for t in self.tiers)

    def health(self) -> dict[str, bool]:
        """Per tier, for ``/readyz``; ``bus`` is included when attached."""
        out = {t.name: t.healthy for t in self.tiers}
        if self.bus is not None:
            out["bus"] = self.bus.connected
        return out

    def hit_counts(self, tier: str | None = None, kind: str | None = None) -> dict[str, int]:
        """``{"hit": n, "miss": m}`` summed over the counters that match."""
        out = {"hit": 0, "miss": 0}
        for (t, k, r), n in self.counts.items():
            if (tier is None or t == tier) and (kind is None or k == kind):
                out[r] = out.get(r, 0) + n
        return out

    def stats(self) -> dict[str, Any]:
        """Plain-data snapshot: per-tier stats and the request counters."""
        requests: dict[str, dict[str, dict[str, int]]] = {}
        for (t, k, r), n in self.counts.items():
            requests.setdefault(t, {}).setdefault(k, {})[r] = n
        return {
            "tiers": {t.name: t.stats() for t in self.tiers},
            "requests": requests,
            "remote_invalidations": self.remote_invalidations,
            "resyncs": self.resyncs,
        }


def build_cache(settings: CacheSettings, data_dir: Path, *, metrics: bool = True) -> TieredCache:
    """Assemble the tiers the settings enable: L1 (memory), L2 (Redis, only with a
    ``redis_url``), L3 (disk under ``data_dir/"cache"``), plus the invalidation bus
    when Redis is configured.  ``cache.enabled=False`` gives a cache with no tiers
    (every read misses, writes are dropped).  With ``cache.encryption_key`` L2 and L3 seal their
    values (:mod:`ragline.cache.crypto`); L1 keeps plaintext."""
    tiers: list[CacheTier] = []
    bus: InvalidationBus | None = None
    cipher = cipher_from(settings)
    if settings.enabled:
        if settings.l1_enabled and settings.l1_max_bytes > 0:
            tiers.append(MemoryTier(settings.l1_max_bytes, max_ttl_s=settings.l1_max_ttl_s))
        if settings.l2_enabled and settings.redis_url:
            tiers.append(
                RedisTier(
                    settings.redis_url,
                    timeout_s=settings.redis_timeout_s,
                    connect_timeout_s=settings.redis_connect_timeout_s,
                    max_connections=settings.redis_max_connections,
                    failure_threshold=settings.breaker_failures,
                    reset_s=settings.breaker_reset_s,
                    cipher=cipher,
                )
            )
            bus = InvalidationBus(settings.redis_url, settings.pubsub_channel)
        if settings.l3_enabled and settings.l3_max_bytes > 0:
            tiers.append(
                DiskTier(
                    Path(data_dir) / "cache", settings.l3_max_bytes, timeout_s=settings.l3_timeout_s, cipher=cipher
                )
            )
    return TieredCache(
        tiers,
        # the longest kind's: a promotion copies an entry with its remaining TTL, capped by this
        default_ttl_s=max(settings.ttl_for(kind) for kind in ("answer", "retrieval", "embedding", "llm", "function")),
        bus=bus,
        resync_clear_local=settings.resync_clear_local,
        metrics=metrics,
    )
