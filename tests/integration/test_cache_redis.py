"""The cache storage layer against a real redis-server: L2 round trips, TTL, prefix
clears, promotion, fail-open behaviour under a killed or hung Redis, recovery, pub/sub
invalidation between two instances and cross-instance single-flight."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from ragline.cache.bus import InvalidationBus
from ragline.cache.keys import make_key, tenant_prefix
from ragline.cache.marks import mark, new_token
from ragline.cache.memory import MemoryTier
from ragline.cache.redis import RedisTier
from ragline.cache.singleflight import DistributedSingleFlight
from ragline.cache.tiered import TieredCache
from tests.fixtures.redis_server import RedisServer

pytestmark = pytest.mark.slow


def key(i: int, tenant: str = "t1", kind: str = "answer") -> str:
    return make_key(tenant, kind, f"q{i}")


def tier(url: str, **kw: Any) -> RedisTier:
    # generous default so a loaded CI machine gives no false timeouts; the fault
    # tests pass their own (short) timeout explicitly
    opts: dict[str, Any] = {"timeout_s": 0.5, "failure_threshold": 3, "reset_s": 0.2}
    opts.update(kw)
    return RedisTier(url, **opts)


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    with contextlib.suppress(Exception):
        await client.aclose()


async def wait_until(pred: Any, timeout: float = 5.0, step: float = 0.02) -> float:
    """Await ``pred()`` (sync or async) until truthy; return the time it took."""
    t0 = time.monotonic()
    while True:
        res = pred()
        if asyncio.iscoroutine(res):
            res = await res
        if res:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(step)


# ------------------------------------------------------------------------------ basics


async def test_roundtrip_ttl_and_delete(redis_url: str, raw: aioredis.Redis) -> None:
    l2 = tier(redis_url)
    await l2.set_many({key(1): b"one", key(2): b"two"}, ttl=60)
    assert await l2.get_many([key(1), key(2), key(3)]) == {key(1): b"one", key(2): b"two"}
    got = await l2.get_many_ttl([key(1), key(3)])
    assert got[key(1)][0] == b"one" and 59 < (got[key(1)][1] or 0) <= 60
    assert await raw.pttl(key(1)) > 59_000  # SET ... PX really set
    await l2.set_many({key(4): b"brief"}, ttl=0.1)
    assert await l2.get_many([key(4)]) == {key(4): b"brief"}
    await asyncio.sleep(0.2)
    assert await l2.get_many([key(4)]) == {}
    await l2.delete_many([key(1)])
    assert await l2.get_many([key(1), key(2)]) == {key(2): b"two"}
    assert l2.healthy and l2.errors == 0
    # a value not written by a RedisTier (no envelope) is never returned
    await raw.set(key(5), b"foreign", px=60_000)
    assert await l2.get_many([key(5)]) == {}
    await l2.close()


async def test_mark_in_place_keeps_ttl_and_compare_and_set_respects_newer_marks(
    redis_url: str, raw: aioredis.Redis
) -> None:
    l2 = tier(redis_url)
    await l2.set_many({key(1): b"{one}", key(2): b"{two}"}, ttl=60)
    t1, t2 = new_token(), new_token()
    await l2.mark_many([key(1), key(3)], t1)  # key(3) is absent: nothing is created
    got = await l2.get_many_ttl([key(1), key(2), key(3)])
    assert got[key(1)][0] == mark(b"{one}", t1) and got[key(2)][0] == b"{two}" and key(3) not in got
    assert 59 < (got[key(1)][1] or 0) <= 60 and await raw.pttl(key(1)) > 59_000  # envelope and PX kept
    await l2.mark_many([key(1)], t2)  # a newer change
    assert (await l2.get_many([key(1)]))[key(1)] == mark(b"{one}", t2)
    assert not await l2.replace(key(1), mark(b"{one}", t1), b"{one}")  # a stale verification
    assert await l2.replace(key(1), mark(b"{one}", t2), b"{one}")
    assert await l2.get_many([key(1)]) == {key(1): b"{one}"} and await raw.pttl(key(1)) > 59_000
    await l2.close()


async def test_marking_an_unreachable_redis_deletes_instead(redis_server: RedisServer, redis_url: str) -> None:
    l2 = tier(redis_url, timeout_s=0.2, failure_threshold=1, reset_s=0.2)
    await l2.set_many({key(1): b"{v}"}, ttl=60)
    redis_server.pause()
    try:
        await l2.mark_many([key(1)], new_token())  # cannot mark: owes the delete instead
        assert l2.pending_deletes >= 1
    finally:
        redis_server.resume()
    assert await l2.get_many([key(1)]) == {}  # never served unverified, not even before the replay

    async def replayed() -> bool:
        await l2.get_many([key(2)])  # calls probe the breaker; a success replays the owed delete
        return l2.pending_deletes == 0

    await wait_until(replayed, timeout=5.0)
    assert await l2.get_many([key(1)]) == {}
    await l2.close()


async def test_concurrent_reads_are_coalesced(redis_url: str) -> None:
    l2 = tier(redis_url)
    await l2.set_many({key(i): b"v%d" % i for i in range(50)}, ttl=60)
    results = await asyncio.gather(*(l2.get_many([key(i % 60)]) for i in range(600)))
    for i, r in enumerate(results):
        assert r == ({key(i % 60): b"v%d" % (i % 60)} if i % 60 < 50 else {})
    # the first call went straight out; the 599 that arrived while it was in flight
    # shared one MGET (one batch per event-loop tick)
    assert l2.batched_requests == 599 and l2.batches == 1
    # a cancelled caller does not disturb the others in its batch
    t0 = asyncio.ensure_future(l2.get_many([key(0)]))  # goes straight out, stays in flight
    t1 = asyncio.ensure_future(l2.get_many([key(1)]))  # these two join the next batch
    t2 = asyncio.ensure_future(l2.get_many([key(2)]))
    await asyncio.sleep(0)
    t1.cancel()
    assert await t2 == {key(2): b"v2"}
    assert await t0 == {key(0): b"v0"}
    with pytest.raises(asyncio.CancelledError):
        await t1
    await l2.close()


async def test_prefix_clear_is_exact(redis_url: str, raw: aioredis.Redis) -> None:
    l2 = tier(redis_url)
    await l2.set_many({key(i): b"x" for i in range(2500)}, ttl=60)  # > one SCAN page
    await l2.set_many({key(1, tenant="t10"): b"y", key(2, tenant="t2"): b"z"}, ttl=60)
    await raw.set("foreign:data", b"keep")  # not ours: never touched
    assert await l2.clear(tenant_prefix("t1")) == 2500
    assert await raw.dbsize() == 3  # "t1" did not match "t10"
    assert await l2.clear(None) == 2  # every rl: key ...
    assert await raw.get("foreign:data") == b"keep"  # ... and nothing else
    await l2.close()


async def test_tiered_promotion_l2_to_l1(redis_url: str) -> None:
    l2 = tier(redis_url)
    a = TieredCache([MemoryTier(1 << 20), l2], default_ttl_s=3600, metrics=False)
    b = TieredCache([MemoryTier(1 << 20), tier(redis_url)], default_ttl_s=3600, metrics=False)
    await a.set_many({key(1): b"v1", key(2, kind="retrieval"): b"r"}, ttl=30)
    assert a.get_l1(key(1)) == b"v1"  # written to every tier
    # instance b has it only in L2: read-through, then promoted into b's L1
    assert b.get_l1(key(1)) is None
    assert await b.get_with_tier(key(1), skip_l1=True) == (b"v1", "l2")
    assert b.l1 is not None
    hit = b.l1.get_ttl(key(1))
    assert hit is not None and hit[0] == b"v1" and hit[1] <= 30  # remaining TTL, not the default
    assert b.get_l1(key(1)) == b"v1"
    assert await b.get_with_tier(key(1)) == (b"v1", "l1")
    assert await b.get_many([key(1), key(2, kind="retrieval"), key(3)]) == {
        key(1): b"v1",
        key(2, kind="retrieval"): b"r",
    }
    assert b.hit_counts("l2", "retrieval") == {"hit": 1, "miss": 0}
    assert b.hit_counts("l2", "answer") == {"hit": 1, "miss": 1}
    await a.close()
    await b.close()


# ------------------------------------------------------------------------------ fail open


async def test_fail_open_when_redis_dies_and_recovery(redis_server: RedisServer, redis_url: str) -> None:
    l2 = tier(redis_url, timeout_s=0.2, failure_threshold=3, reset_s=0.2)
    cache = TieredCache([MemoryTier(1 << 20), l2], metrics=False)
    await cache.set_many({key(1): b"v"})
    assert await l2.get_many([key(1)]) == {key(1): b"v"}

    redis_server.stop()
    # every call returns (a miss / a dropped write) without raising, quickly
    for i in range(5):
        t0 = time.perf_counter()
        assert await l2.get_many([key(1)]) == {}
        await l2.set_many({key(i + 10): b"w"}, ttl=60)
        await cache.set_many({key(i + 20): b"w"})
        assert await cache.get_with_tier(key(99)) == (None, None)
        assert time.perf_counter() - t0 < 0.5
    assert l2.breaker.state in ("open", "half_open")
    assert not l2.healthy and not cache.healthy
    assert cache.health()["l2"] is False
    assert l2.errors >= 3
    # while open, calls do not even try: microseconds, counted as skipped
    skipped = l2.skipped
    t0 = time.perf_counter()
    for _ in range(100):
        await l2.get_many([key(1)])
    assert (time.perf_counter() - t0) / 100 < 0.005
    assert l2.skipped > skipped
    # L1 keeps serving
    assert cache.get_l1(key(1)) == b"v"

    redis_server.start()  # empty (no persistence); write through another instance's tier
    other = tier(redis_url)
    await other.set_many({key(1): b"back"}, ttl=60)
    assert other.healthy
    await other.close()

    async def l2_hit() -> bool:
        return await l2.get_many([key(1)]) == {key(1): b"back"}

    took = await wait_until(l2_hit, timeout=5.0)
    assert took < 5.0
    assert l2.healthy and l2.breaker.state == "closed" and cache.healthy
    await cache.close()


async def test_hung_redis_is_bounded_by_timeout(redis_server: RedisServer, redis_url: str) -> None:
    l2 = tier(redis_url, timeout_s=0.05, failure_threshold=2, reset_s=0.2)
    await l2.set_many({key(1): b"v"}, ttl=60)
    redis_server.pause()  # accepts nothing, answers nothing
    try:
        durations = []
        for _ in range(4):
            t0 = time.perf_counter()
            assert await l2.get_many([key(1)]) == {}
            durations.append(time.perf_counter() - t0)
        assert max(durations) < 0.25, durations  # bounded by timeout_s (50 ms), not by TCP
        assert not l2.healthy
        # an invalidation during the outage is remembered ...
        await l2.delete_many([key(1)])
        assert l2.pending_deletes == 1
    finally:
        redis_server.resume()

    # ... and applied before the breaker closes again: the stale value is never served
    async def recovered() -> bool:
        got = await l2.get_many([key(1)])
        assert got == {}, "stale value served after recovery"
        return l2.healthy

    await wait_until(recovered, timeout=5.0)
    assert l2.pending_deletes == 0
    await l2.close()


async def test_failed_delete_with_closed_breaker_is_replayed(redis_server: RedisServer, redis_url: str) -> None:
    l2 = tier(redis_url, timeout_s=0.05, failure_threshold=100)
    await l2.set_many({key(1): b"stale", key(2): b"fine"}, ttl=60)
    redis_server.pause()
    try:
        await l2.delete_many([key(1)])  # times out; the breaker stays closed
    finally:
        redis_server.resume()
    assert l2.healthy and l2.pending_deletes == 1
    # the first successful call answers without the owed key and triggers the replay
    assert await l2.get_many([key(1), key(2)]) == {key(2): b"fine"}
    await wait_until(lambda: l2.pending_deletes == 0, timeout=2.0)
    raw = aioredis.Redis.from_url(redis_url)
    assert await raw.exists(key(1)) == 0
    await raw.aclose()
    await l2.close()


async def test_pool_saturation_is_a_miss_not_an_outage(redis_url: str) -> None:
    l2 = tier(redis_url, max_connections=4)
    await l2.set_many({key(1): b"v"}, ttl=60)
    results = await asyncio.gather(*(l2.get_many([key(1)]) for _ in range(3000)))
    hits = sum(1 for r in results if r)
    assert hits > 0
    assert hits + l2.saturated == 3000  # every call answered: a hit or a fast miss
    assert l2.healthy and l2.breaker.opens_total == 0  # local saturation is not a Redis failure
    await l2.close()
    # without coalescing, the semaphore in front of the pool turns overflow into fast misses
    l2 = tier(redis_url, max_connections=2, pool_wait_s=0.0005, coalesce=False, timeout_s=0.5)
    await l2.set_many({key(1): b"v"}, ttl=60)
    results = await asyncio.gather(*(l2.get_many([key(1)]) for _ in range(200)))
    hits = sum(1 for r in results if r)
    assert l2.saturated > 0 and hits > 0
    assert hits + l2.saturated == 200 and l2.errors == 0
    assert l2.healthy and l2.breaker.opens_total == 0
    await l2.close()


# ------------------------------------------------------------------------------ pub/sub


async def test_pubsub_invalidation_reaches_other_instance(redis_server: RedisServer, redis_url: str) -> None:
    def make() -> TieredCache:
        bus = InvalidationBus(redis_url, "ragline:test", ping_interval_s=0.5, backoff_max_s=0.2)
        return TieredCache([MemoryTier(1 << 20), tier(redis_url)], bus=bus, metrics=False)

    a, b = make(), make()
    await a.start()
    await b.start()
    assert a.bus is not None and b.bus is not None
    assert await a.bus.wait_connected() and await b.bus.wait_connected()

    await a.set_many({key(1): b"v1", key(2): b"v2", key(3, tenant="t2"): b"v3"})
    for k in (key(1), key(2), key(3, tenant="t2")):
        await b.get(k)  # promote into b's L1
    assert b.l1 is not None and len(b.l1) == 3

    await a.delete_many([key(1)])  # deletes L2 and a's L1, tells b
    await wait_until(lambda: key(1) not in b.l1, timeout=2.0)
    assert b.get_l1(key(2)) == b"v2"
    assert await b.get(key(1)) is None  # gone from L2 as well

    await a.clear(tenant_prefix("t2"))
    await wait_until(lambda: key(3, tenant="t2") not in b.l1, timeout=2.0)
    assert b.get_l1(key(2)) == b"v2"
    assert b.remote_invalidations == 2 and a.remote_invalidations == 0  # own events skipped

    # Redis restarts: the subscriber reconnects and, having missed events, drops b's L1
    resyncs = b.resyncs
    redis_server.stop()
    await asyncio.sleep(0.3)
    redis_server.start()
    await wait_until(lambda: b.resyncs > resyncs, timeout=5.0)
    assert len(b.l1) == 0
    assert await b.bus.wait_connected()
    # and invalidations flow again
    await a.set_many({key(5): b"v5"})
    await b.get(key(5))
    assert key(5) in b.l1
    await a.delete_many([key(5)])
    await wait_until(lambda: key(5) not in b.l1, timeout=2.0)
    await a.close()
    await b.close()


async def test_publish_during_outage_is_retried(redis_server: RedisServer, redis_url: str) -> None:
    received: list[Any] = []

    async def on_inv(keys: list[str] | None, prefix: str | None) -> None:
        received.append((keys, prefix))

    async def noop() -> None:
        return None

    pub = InvalidationBus(redis_url, "ragline:test2", timeout_s=0.1, backoff_max_s=0.2)
    sub = InvalidationBus(redis_url, "ragline:test2", ping_interval_s=2.0, backoff_max_s=0.2)
    sub.start(on_inv, noop)
    assert await sub.wait_connected()
    await pub.publish(keys=[key(0)])  # warm the publisher's connection
    await wait_until(lambda: received, timeout=2.0)
    # Redis hangs briefly: the publish times out, is queued, and is not raised ...
    redis_server.pause()
    try:
        t0 = time.perf_counter()
        assert await pub.publish(keys=[key(1)]) is False
        assert time.perf_counter() - t0 < 0.5
        assert pub.pending == 1
    finally:
        redis_server.resume()
    # ... and delivered once it answers again (the subscriber stayed connected)
    await wait_until(lambda: pub.pending == 0, timeout=5.0)
    # at-least-once: the timed-out PUBLISH may also have reached Redis (it was already
    # written to the socket); dropping a key twice is harmless
    await wait_until(lambda: ([key(1)], None) in received, timeout=5.0)
    assert all(r in (([key(0)], None), ([key(1)], None)) for r in received)
    assert sub.resyncs == 0
    await pub.stop()
    await sub.stop()


# ------------------------------------------------------------------------------ single-flight


async def test_cross_instance_singleflight_one_computation(redis_url: str) -> None:
    calls = 0

    def instance() -> tuple[TieredCache, DistributedSingleFlight[bytes]]:
        l2 = tier(redis_url, timeout_s=0.2)
        cache = TieredCache([MemoryTier(1 << 20), l2], metrics=False)
        return cache, DistributedSingleFlight(l2, lock_s=5, wait_s=5, poll_s=0.02)

    (c1, sf1), (c2, sf2) = instance(), instance()
    k = key(42)

    def caller(cache: TieredCache, sf: DistributedSingleFlight[bytes]) -> Any:
        async def compute() -> bytes:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.3)  # an LLM call
            value = b"answer"
            await cache.set_many({k: value})
            return value

        async def poll() -> bytes | None:
            return await cache.get(k)

        return sf.do(k, compute, poll)

    callers = [caller(c1, sf1) for _ in range(10)] + [caller(c2, sf2) for _ in range(10)]
    results = await asyncio.gather(*callers)
    assert results == [b"answer"] * 20
    assert calls == 1
    assert sf1.computed + sf2.computed == 1
    assert sf1.waited + sf2.waited == 1  # the other instance's one (deduplicated) flight polled
    assert c1.l1 is not None and c2.l1 is not None
    assert c1.get_l1(k) == b"answer" and c2.get_l1(k) == b"answer"  # the poller promoted it
    # the lock was released
    raw = aioredis.Redis.from_url(redis_url)
    assert await raw.exists(DistributedSingleFlight.lock_name(k)) == 0
    await raw.aclose()
    await c1.close()
    await c2.close()


async def test_singleflight_holder_failure_lets_waiter_compute(redis_url: str) -> None:
    l2a, l2b = tier(redis_url, timeout_s=0.2), tier(redis_url, timeout_s=0.2)
    sfa: DistributedSingleFlight[str] = DistributedSingleFlight(l2a, lock_s=5, wait_s=5, poll_s=0.02)
    sfb: DistributedSingleFlight[str] = DistributedSingleFlight(l2b, lock_s=5, wait_s=5, poll_s=0.02)

    async def failing() -> str:
        await asyncio.sleep(0.1)
        raise RuntimeError("llm down")

    async def ok() -> str:
        return "b computed"

    async def nothing() -> str | None:
        return None

    ta = asyncio.create_task(sfa.do("k", failing, nothing))
    await asyncio.sleep(0.02)
    t0 = time.monotonic()
    result_b = await sfb.do("k", ok, nothing)
    assert result_b == "b computed"
    assert time.monotonic() - t0 < 1.0  # took over as soon as the lock was released
    with pytest.raises(RuntimeError):
        await ta
    await l2a.close()
    await l2b.close()


async def test_singleflight_lease_outlives_a_long_computation(redis_url: str) -> None:
    """The holder renews its lease: a computation three leases long is still computed once."""
    l2a, l2b = tier(redis_url, timeout_s=0.2), tier(redis_url, timeout_s=0.2)
    sfa: DistributedSingleFlight[str] = DistributedSingleFlight(l2a, lock_s=0.3, wait_s=5, poll_s=0.02)
    sfb: DistributedSingleFlight[str] = DistributedSingleFlight(l2b, lock_s=0.3, wait_s=5, poll_s=0.02)
    done: list[str] = []

    async def slow() -> str:
        await asyncio.sleep(1.0)
        done.append("a")
        return "a computed"

    async def other() -> str:
        return "b computed"

    async def poll() -> str | None:
        return "a computed" if done else None

    ta = asyncio.create_task(sfa.do("long", slow, poll))
    await asyncio.sleep(0.05)
    assert await sfb.do("long", other, poll) == "a computed"
    assert await ta == "a computed"
    assert sfb.computed == 0 and sfb.waited == 1 and sfa.lost == 0
    await l2a.close()
    await l2b.close()


_HOLDER = """
import asyncio, sys
from ragline.cache.redis import RedisTier
from ragline.cache.singleflight import DistributedSingleFlight

async def main() -> None:
    sf = DistributedSingleFlight(RedisTier(sys.argv[1], timeout_s=0.5))  # default lease

    async def forever() -> str:
        print("computing", flush=True)
        await asyncio.sleep(3600)
        return "never"

    async def nothing() -> None:
        return None

    await sf.do("dead", forever, nothing)

asyncio.run(main())
"""


async def test_a_killed_holders_keys_free_up_within_the_lease(redis_url: str) -> None:
    """An instance SIGKILLed mid-computation leaves its lock behind, no longer renewed: another
    instance takes it over when the lease runs out, well before ``wait_s`` (with the fixed 30 s
    lock of earlier stops it waited the whole 10 s: the cluster kill test's read timeouts)."""
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, redis_url], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"computing\n", f"holder exited with {holder.poll()}"
        await asyncio.sleep(4.0)  # past the first lease: the holder renewed it
        raw = aioredis.Redis.from_url(redis_url)
        assert await raw.exists(DistributedSingleFlight.lock_name("dead")) == 1
        holder.kill()
        holder.wait(10)
        l2 = tier(redis_url, timeout_s=0.5)
        sf: DistributedSingleFlight[str] = DistributedSingleFlight(l2, wait_s=10, poll_s=0.02)

        async def compute() -> str:
            return "computed here"

        async def poll() -> str | None:
            return None

        t0 = time.monotonic()
        assert await sf.do("dead", compute, poll) == "computed here"
        took = time.monotonic() - t0
        assert took < sf.lock_s + 1.0, took
        assert sf.timeouts == 0 and sf.computed == 1
        await raw.aclose()
        await l2.close()
    finally:
        holder.kill()
        holder.wait(10)


async def test_singleflight_fails_open_without_redis(redis_server: RedisServer, redis_url: str) -> None:
    l2 = tier(redis_url, timeout_s=0.05)
    sf: DistributedSingleFlight[int] = DistributedSingleFlight(l2, lock_s=5, wait_s=5)
    redis_server.stop()
    calls = 0

    async def compute() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return 1

    async def poll() -> int | None:
        return None

    t0 = time.monotonic()
    assert await asyncio.gather(*(sf.do("k", compute, poll) for _ in range(5))) == [1] * 5
    assert time.monotonic() - t0 < 1.0
    assert calls == 1  # still deduplicated in-process
    assert sf.lockless == 1
    await l2.close()
