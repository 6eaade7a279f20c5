"""Cache storage layer without services: keys, L1 memory tier, L3 disk tier, the tiered
composition, the circuit breaker, in-process single-flight and the metrics collector."""

from __future__ import annotations

import asyncio
import gc
import importlib
import os
import re
import tracemalloc
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, generate_latest

from ragline.cache import metrics as cache_metrics
from ragline.cache.behind import WriteBehind
from ragline.cache.disk import DiskTier
from ragline.cache.keys import (
    canonical_bytes,
    canonical_query,
    kind_of,
    kind_prefix,
    make_key,
    make_key_for,
    parse_key,
    tenant_prefix,
)
from ragline.cache.memory import MemoryTier
from ragline.cache.singleflight import DistributedSingleFlight, SingleFlight
from ragline.cache.tiered import TieredCache, build_cache
from ragline.config import CacheSettings
from ragline.errors import InvalidInput
from ragline.infra.breaker import CircuitBreaker


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def key(i: int, tenant: str = "t1", kind: str = "answer") -> str:
    return make_key(tenant, kind, f"q{i}")


# ------------------------------------------------------------------------------ keys


def test_key_format() -> None:
    k = make_key("acme", "answer", b"hello")
    assert re.fullmatch(r"rl:v1:acme:answer:[0-9a-f]{32}", k)
    assert make_key("acme", "answer", "hello") == k  # str and bytes hash the same
    assert make_key("acme", "answer", b"hello", schema=2).startswith("rl:v2:acme:answer:")
    assert make_key("acme", "retrieval", b"hello") != k
    assert make_key("other", "answer", b"hello") != k
    assert parse_key(k) == (1, "acme", "answer", k.rsplit(":", 1)[1])
    assert kind_of(k) == "answer"
    assert kind_of(make_key("a.b-c_d", "embedding", b"x")) == "embedding"
    assert kind_of("not-a-key") == "other"
    assert k.startswith(tenant_prefix("acme"))
    assert k.startswith(kind_prefix("acme", "answer"))
    assert not make_key("acme2", "answer", b"x").startswith(tenant_prefix("acme"))


def test_hot_path_kind_label_matches_kind_of() -> None:
    from ragline.cache.keys import KINDS

    cache = TieredCache([MemoryTier(1 << 20)], metrics=False)
    for kind in sorted(KINDS):
        for tenant in ("a", "tenant-with.long_name"):
            k = make_key(tenant, kind, b"x")
            cache.get_l1(k)
            assert cache.hit_counts("l1", kind_of(k))["miss"] >= 1
    cache.get_l1("short")
    assert cache.counts[("l1", "other", "miss")] == 1
    assert sum(cache.hit_counts("l1")[r] for r in ("hit", "miss")) == 2 * len(KINDS) + 1


def test_canonical_bytes_order_independent() -> None:
    a = make_key_for("t", "answer", {"q": "x", "params": {"k": 10, "model": "m"}})
    b = make_key_for("t", "answer", {"params": {"model": "m", "k": 10}, "q": "x"})
    assert a == b
    assert canonical_bytes({"b": 1, "a": [1, 2]}) == b'{"a":[1,2],"b":1}'
    assert make_key_for("t", "answer", {"q": "x", "temperature": 0.0}) != make_key_for(
        "t", "answer", {"q": "x", "temperature": 0.1}
    )


@pytest.mark.parametrize("bad", ["", "a:b", "a*", "te nant", "ü", "-lead", "x" * 65, "a[b]", "a?", "a/b", "a\nb"])
def test_tenant_validation_rejects(bad: str) -> None:
    with pytest.raises(InvalidInput):
        make_key(bad, "answer", b"x")
    with pytest.raises(InvalidInput):
        tenant_prefix(bad)


def test_tenant_validation_accepts() -> None:
    for good in ("default", "acme", "A1", "team.prod-2", "a_b", "x" * 64):
        assert make_key(good, "answer", b"x").split(":")[2] == good


def test_unknown_kind() -> None:
    with pytest.raises(ValueError):
        make_key("t", "bogus", b"x")
    with pytest.raises(ValueError):
        parse_key("rl:v1:t:bogus:" + "0" * 32)


def test_canonical_query() -> None:
    assert canonical_query("  What   is\tRAG?\n") == "what is rag"  # trailing punctuation: ragline.canonical
    assert canonical_query("CAFE\u0301") == canonical_query("café")  # NFC
    assert canonical_query("Straße") == canonical_query("STRASSE")  # casefold
    assert canonical_query("x²") != canonical_query("x2")  # no NFKC
    assert canonical_query("is it safe?") == canonical_query("is it safe")  # trailing punctuation absorbed
    assert canonical_query("is it safe?") != canonical_query("is it not safe")  # negation kept
    assert canonical_query("a\u00a0b") == "a b"  # NBSP is whitespace


# ------------------------------------------------------------------------------ L1 memory


def test_memory_byte_bound_holds_under_10x_writes() -> None:
    bound = 2 * 1024 * 1024
    tier = MemoryTier(bound)
    value_sizes = [50, 300, 1200, 4000]
    written = 0
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    i = 0
    while written < 10 * bound:
        v = os.urandom(value_sizes[i % len(value_sizes)])
        k = key(i)
        tier.set(k, v, ttl=60)
        written += len(k) + len(v)
        assert tier.bytes <= bound
        i += 1
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert tier.evictions > 0
    assert tier.bytes <= bound
    # the accounting matches reality: what the tier holds is within its bound (plus the
    # loop's own transient objects and the OrderedDict's spare capacity, ≤ 10 %)
    assert used <= bound * 1.10, (used, bound)
    # and the bound is not wildly conservative either: ≥ 50 % of it holds real data
    assert used >= bound * 0.5
    # accounting is exact: recompute from the entries
    recomputed = sum(len(k) + len(v) + tier.entry_overhead for k, (v, _) in tier._data.items())
    assert recomputed == tier.bytes


def test_memory_lru_order_and_eviction() -> None:
    k1, k2, k3, k4 = key(1), key(2), key(3), key(4)
    size = len(k1) + 100 + MemoryTier(1).entry_overhead
    tier = MemoryTier(3 * size, max_entry_bytes=size)
    for k in (k1, k2, k3):
        assert tier.set(k, b"x" * 100, ttl=60)
    assert tier.keys_lru() == [k1, k2, k3]
    assert tier.get(k1) is not None  # k1 becomes most recent
    assert tier.keys_lru() == [k2, k3, k1]
    tier.set(k4, b"y" * 100, ttl=60)  # evicts the LRU: k2
    assert k2 not in tier and tier.get(k2) is None
    assert tier.keys_lru() == [k3, k1, k4]
    assert tier.evictions == 1
    # overwrite updates the size accounting and recency
    tier.set(k3, b"z" * 50, ttl=60)
    assert tier.keys_lru() == [k1, k4, k3]
    assert tier.bytes == 3 * size - 50


def test_memory_rejects_oversized_and_nonpositive_ttl() -> None:
    tier = MemoryTier(10_000, max_entry_bytes=2_000)
    assert not tier.set(key(1), b"x" * 5_000, ttl=60)
    assert tier.rejected == 1 and len(tier) == 0 and tier.bytes == 0
    tier.set(key(2), b"ok", ttl=60)
    assert not tier.set(key(2), b"new", ttl=0)  # ttl <= 0 drops the old value too
    assert tier.get(key(2)) is None and tier.bytes == 0


def test_memory_ttl_with_injectable_clock() -> None:
    clock = FakeClock()
    tier = MemoryTier(1 << 20, clock=clock, max_ttl_s=100)
    tier.set(key(1), b"a", ttl=10)
    tier.set(key(2), b"b", ttl=1000)  # capped at max_ttl_s=100
    assert tier.get(key(1)) == b"a"
    hit = tier.get_ttl(key(1))
    assert hit is not None and hit[1] == pytest.approx(10)
    clock.advance(9.999)
    assert tier.get(key(1)) == b"a"
    clock.advance(0.001)
    assert tier.get(key(1)) is None  # expired exactly at its deadline, never returned
    assert tier.expirations == 1 and key(1) not in tier  # lazily removed
    clock.advance(89)
    assert tier.get(key(2)) == b"b"
    clock.advance(1)
    assert tier.get(key(2)) is None
    assert tier.bytes == 0
    # purge_expired sweeps untouched expired entries
    tier.set(key(3), b"c", ttl=5)
    tier.set(key(4), b"d", ttl=50)
    clock.advance(6)
    assert tier.purge_expired() == 1
    assert len(tier) == 1


async def test_memory_async_api_and_clear() -> None:
    tier = MemoryTier(1 << 20)
    await tier.set_many({key(1): b"a", key(2, tenant="t2"): b"b", key(3, kind="embedding"): b"c"}, 60)
    assert await tier.get_many([key(1), key(2, tenant="t2"), key(9)]) == {
        key(1): b"a",
        key(2, tenant="t2"): b"b",
    }
    assert await tier.clear(tenant_prefix("t1")) == 2
    assert await tier.get_many([key(1), key(3, kind="embedding")]) == {}
    await tier.delete_many([key(2, tenant="t2")])
    assert len(tier) == 0 and tier.bytes == 0


# ------------------------------------------------------------------------------ L3 disk


async def test_disk_tier_roundtrip_ttl_and_prefix_clear(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 10 * 1024 * 1024)
    await tier.set_many({key(1): b"one", key(2): b"two", key(3, tenant="t2"): b"three"}, ttl=60)
    got = await tier.get_many_ttl([key(1), key(2), key(9)])
    assert {k: v for k, (v, _) in got.items()} == {key(1): b"one", key(2): b"two"}
    assert 55 < (got[key(1)][1] or 0) <= 60
    await tier.set_many({key(4): b"short"}, ttl=0.05)
    await asyncio.sleep(0.1)
    assert await tier.get_many([key(4)]) == {}
    assert await tier.clear(tenant_prefix("t1")) >= 2
    assert await tier.get_many([key(1), key(2), key(3, tenant="t2")]) == {key(3, tenant="t2"): b"three"}
    await tier.delete_many([key(3, tenant="t2")])
    assert await tier.get_many([key(3, tenant="t2")]) == {}
    assert tier.healthy
    await tier.close()


async def test_disk_tier_byte_bound(tmp_path: Path) -> None:
    bound = 1024 * 1024
    tier = DiskTier(tmp_path, bound)
    root = Path(tmp_path)
    peak = 0
    written = 0
    i = 0
    while written < 10 * bound:  # 1 KiB .. 64 KiB values: inline rows and value files
        items = {}
        for _ in range(16):
            v = os.urandom(1024 * (1 + (i * 7) % 64))
            items[key(i)] = v
            written += len(v)
            i += 1
        await tier.set_many(items, ttl=600)
        # measured on disk while running (database + WAL + value files), not after close
        peak = max(peak, sum(f.stat().st_size for f in root.rglob("*") if f.is_file()))
    # diskcache's size_limit is soft (it culls at most 10 rows per write), so allow a margin
    assert tier.volume() <= bound * 1.15, tier.volume()
    assert peak <= bound * 1.25, peak
    assert len(await tier.get_many([key(i - 1)])) == 1  # recent entries survive
    assert await tier.get_many([key(0)]) == {}  # the oldest were culled
    await tier.close()


async def test_disk_failed_delete_is_owed_and_never_served_stale(tmp_path: Path) -> None:
    import sqlite3

    tier = DiskTier(tmp_path, 1 << 24, timeout_s=0.05)
    await tier.set_many({key(1): b"stale", key(2): b"fine"}, ttl=60)
    # another process holds the write lock: the delete times out (a real SQLite failure)
    locker = sqlite3.connect(str(Path(tmp_path) / "cache.db"), timeout=0.05, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        await tier.delete_many([key(1)])
        assert tier.pending_deletes == 1 and tier.errors == 1
        # the value is still on disk, but the tier never returns it
        assert await tier.get_many([key(1), key(2)]) == {key(2): b"fine"}
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    await tier.set_many({key(3): b"x"}, ttl=60)  # a successful call triggers the replay
    assert tier._replay_task is not None
    await tier._replay_task
    assert tier.pending_deletes == 0
    assert tier._cache.get(key(1)) is None  # really deleted
    await tier.close()


# ------------------------------------------------------------------------------ tiered


async def test_tiered_l1_l3_promotion_counters_and_ttl(tmp_path: Path) -> None:
    l1 = MemoryTier(1 << 20)
    l3 = DiskTier(tmp_path, 1 << 24)
    cache = TieredCache([l1, l3], default_ttl_s=3600, metrics=False)
    k = key(1)
    await l3.set_many({k: b"v"}, ttl=30)  # only in L3
    assert cache.get_l1(k) is None
    value, tier = await cache.get_with_tier(k, skip_l1=True)
    assert (value, tier) == (b"v", "l3")
    # promoted into L1 with the *remaining* TTL, not the default
    hit = l1.get_ttl(k)
    assert hit is not None and hit[0] == b"v" and hit[1] <= 30
    assert cache.get_l1(k) == b"v"
    assert await cache.get_with_tier(k) == (b"v", "l1")
    assert await cache.get_with_tier(key(2)) == (None, None)
    assert cache.hit_counts("l1", "answer") == {"hit": 2, "miss": 2}
    assert cache.hit_counts("l3") == {"hit": 1, "miss": 1}
    # set_many writes every tier; delete_many removes from every tier
    await cache.set_many({key(3, kind="embedding"): b"e"})
    assert l1.get(key(3, kind="embedding")) == b"e"
    assert await l3.get_many([key(3, kind="embedding")]) == {key(3, kind="embedding"): b"e"}
    assert cache.hit_counts(kind="embedding") == {"hit": 0, "miss": 0}
    await cache.delete_many([k])
    assert await cache.get(k) is None
    # clear(prefix) on all tiers; get_many across tiers
    await cache.set_many({key(5): b"5", key(6, tenant="t2"): b"6"})
    await cache.clear(tenant_prefix("t1"))
    assert await cache.get_many([key(5), key(6, tenant="t2")]) == {key(6, tenant="t2"): b"6"}
    assert cache.healthy and cache.health() == {"l1": True, "l3": True}
    stats = cache.stats()
    assert stats["requests"]["l1"]["answer"]["hit"] == cache.hit_counts("l1", "answer")["hit"] == 3
    await cache.close()


async def test_invalidate_local_leaves_shared_tiers(tmp_path: Path) -> None:
    l1 = MemoryTier(1 << 20)
    l3 = DiskTier(tmp_path, 1 << 24)
    cache = TieredCache([l1, l3], metrics=False)
    await cache.set_many({key(1): b"a", key(2): b"b"})
    await cache.invalidate_local(keys=[key(1)])
    assert await cache.get_many([key(1), key(2)]) == {key(2): b"b"}
    await cache._on_resync()
    assert await cache.get_many([key(2)]) == {}
    await cache.close()


def test_build_cache_from_settings(tmp_path: Path) -> None:
    cache = build_cache(CacheSettings(), Path(tmp_path), metrics=False)
    assert [t.name for t in cache.tiers] == ["l1", "l3"]  # no redis_url: no L2, no bus
    assert cache.bus is None
    assert (Path(tmp_path) / "cache").is_dir()
    off = build_cache(CacheSettings(enabled=False), Path(tmp_path), metrics=False)
    assert off.tiers == () and off.get_l1(key(1)) is None
    l1_only = build_cache(CacheSettings(l3_enabled=False), Path(tmp_path), metrics=False)
    assert [t.name for t in l1_only.tiers] == ["l1"]
    with_redis = build_cache(CacheSettings(redis_url="redis://127.0.0.1:1/0"), Path(tmp_path), metrics=False)
    assert [t.name for t in with_redis.tiers] == ["l1", "l2", "l3"] and with_redis.bus is not None


# ------------------------------------------------------------------------------ breaker


def test_breaker_state_machine() -> None:
    clock = FakeClock()
    br = CircuitBreaker(failure_threshold=3, reset_s=1.0, clock=clock)

    def state() -> str:  # a call, so the type checker does not narrow across transitions
        return br.state

    assert state() == "closed" and br.allow()
    br.record_failure()
    br.record_failure()
    br.record_success()  # success resets the consecutive count
    br.record_failure()
    br.record_failure()
    assert state() == "closed"
    br.record_failure()  # third consecutive
    assert state() == "open" and br.opens_total == 1
    assert not br.allow()
    clock.advance(0.999)
    assert not br.allow()
    clock.advance(0.001)
    assert br.allow()  # the one probe
    assert state() == "half_open"
    assert not br.allow() and not br.allow()  # everyone else waits for the probe
    br.record_failure()  # probe failed: open again, timer restarted
    assert state() == "open" and br.opens_total == 2
    clock.advance(0.5)
    assert not br.allow()
    clock.advance(0.5)
    assert br.allow() and state() == "half_open"
    br.record_success()
    assert state() == "closed" and br.allow()


def test_breaker_lost_probe_does_not_wedge() -> None:
    clock = FakeClock()
    br = CircuitBreaker(failure_threshold=1, reset_s=2.0, clock=clock)
    br.record_failure()
    clock.advance(2)
    assert br.allow()  # probe taken ... and never reports (cancelled)
    clock.advance(1)
    assert not br.allow()
    clock.advance(1)
    assert br.allow()  # a new probe after another reset_s


# ------------------------------------------------------------------------------ single-flight


async def test_singleflight_50_callers_one_call() -> None:
    sf: SingleFlight[bytes] = SingleFlight()
    calls = 0
    gate = asyncio.Event()

    async def compute() -> bytes:
        nonlocal calls
        calls += 1
        await gate.wait()
        return b"result"

    tasks = [asyncio.create_task(sf.do("k", compute)) for _ in range(50)]
    await asyncio.sleep(0.01)
    assert sf.in_flight("k") and len(sf) == 1
    gate.set()
    results = await asyncio.gather(*tasks)
    assert results == [b"result"] * 50
    assert calls == 1 and sf.calls == 1 and sf.shared == 49
    assert len(sf) == 0  # no entry leak
    # a later call computes again
    assert await sf.do("k", compute) == b"result" and calls == 2


async def test_singleflight_exception_propagates_to_all() -> None:
    sf: SingleFlight[int] = SingleFlight()
    calls = 0

    async def boom() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        raise RuntimeError("upstream failed")

    results = await asyncio.gather(*(sf.do("k", boom) for _ in range(10)), return_exceptions=True)
    assert calls == 1
    assert all(isinstance(r, RuntimeError) and str(r) == "upstream failed" for r in results)
    assert len(sf) == 0


async def test_singleflight_cancellation() -> None:
    sf: SingleFlight[str] = SingleFlight()
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow() -> str:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    async def fast() -> str:
        await asyncio.sleep(0.02)
        return "ok"

    # one of two waiters cancelled: the other still gets the result
    t1 = asyncio.create_task(sf.do("a", fast))
    t2 = asyncio.create_task(sf.do("a", fast))
    await asyncio.sleep(0)
    t1.cancel()
    assert await t2 == "ok"
    with pytest.raises(asyncio.CancelledError):
        await t1
    # the only waiter cancelled: the computation is cancelled and the entry removed
    t3 = asyncio.create_task(sf.do("b", slow))
    await started.wait()
    t3.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t3
    await asyncio.wait_for(cancelled.wait(), 1)
    await asyncio.sleep(0)
    assert len(sf) == 0


async def test_singleflight_first_caller_cancelled_the_others_keep_its_computation() -> None:
    sf: SingleFlight[str] = SingleFlight()
    calls = 0
    gate = asyncio.Event()

    async def compute() -> str:
        nonlocal calls
        calls += 1
        await gate.wait()
        return f"run {calls}"

    first = asyncio.create_task(sf.do("k", compute))
    await asyncio.sleep(0)
    others = [asyncio.create_task(sf.do("k", compute)) for _ in range(3)]
    await asyncio.sleep(0.01)
    first.cancel()  # its client went away: the computation goes on for the three who wait
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.sleep(0.01)
    assert calls == 1 and sf.in_flight("k")
    gate.set()
    assert await asyncio.gather(*others) == ["run 1"] * 3
    assert len(sf) == 0


async def test_singleflight_result_reaches_the_caller_before_the_write_behind_it_queued() -> None:
    """The computation's own write-behind runs after the caller has the result, not before it."""
    sf: SingleFlight[str] = SingleFlight()
    behind = WriteBehind()
    order: list[str] = []

    async def write() -> None:
        order.append("write-behind")

    async def compute() -> str:
        await asyncio.sleep(0)
        await behind.submit("k", write())
        return "value"

    assert await sf.do("k", compute) == "value"
    order.append("caller has the result")
    await behind.drain()
    assert order == ["caller has the result", "write-behind"]


async def test_distributed_singleflight_without_redis_is_local() -> None:
    dsf: DistributedSingleFlight[int] = DistributedSingleFlight(None)
    calls = 0

    async def compute() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return 7

    async def poll() -> int | None:
        return None

    assert await asyncio.gather(*(dsf.do("k", compute, poll) for _ in range(20))) == [7] * 20
    assert calls == 1


# ------------------------------------------------------------------------------ metrics


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_metrics_sync_deltas_and_duplicate_registration() -> None:
    hit = {"tier": "l1", "kind": "retrieval", "result": "hit"}
    miss = {"tier": "l1", "kind": "retrieval", "result": "miss"}
    h0, m0 = _sample("ragline_cache_requests_total", hit), _sample("ragline_cache_requests_total", miss)
    cache = TieredCache([MemoryTier(1 << 20)], metrics=True)
    k = key(1, kind="retrieval")
    await cache.set_many({k: b"a"})
    assert cache.get_l1(k) == b"a"
    cache.get_l1(key(2, kind="retrieval"))
    # the hot path touched only plain ints; the metric moves on sync
    assert _sample("ragline_cache_requests_total", hit) == h0
    cache.flush_metrics()
    assert _sample("ragline_cache_requests_total", hit) == h0 + 1
    assert _sample("ragline_cache_requests_total", miss) == m0 + 1
    cache.flush_metrics()  # deltas only: no double counting
    assert _sample("ragline_cache_requests_total", hit) == h0 + 1
    assert _sample("ragline_cache_bytes", {"tier": "l1"}) > 0
    assert _sample("ragline_cache_healthy", {"tier": "l1"}) == 1
    # re-importing the module reuses the registered metrics instead of raising
    reloaded = importlib.reload(cache_metrics)
    assert reloaded.REQUESTS is cache_metrics.REQUESTS
    cache.get_l1(k)
    reloaded.sync_all()
    cache.flush_metrics()
    assert _sample("ragline_cache_requests_total", hit) == h0 + 2
    # increments since the last sync are flushed when the cache is garbage-collected
    cache.get_l1(k)
    del cache
    gc.collect()
    assert _sample("ragline_cache_requests_total", hit) == h0 + 3
    text = generate_latest(REGISTRY).decode()
    assert 'ragline_cache_requests_total{kind="retrieval",result="hit",tier="l1"}' in text
    assert 'tenant="' not in text  # /metrics names no tenant
