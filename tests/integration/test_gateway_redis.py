"""The gateway's shared state in a real redis-server: the Lua scripts, sharing across instances,
and failing open to local limits when Redis goes away mid-run.

The scenarios mirror tests/unit/test_gateway_state.py (which drives ``LocalState`` with a fake
clock); here Redis' own clock runs, so waits are short and bounds allow for scheduling.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from ragline.config import GatewaySettings, LLMSettings, UpstreamSettings
from ragline.gateway.redis_state import RedisState
from ragline.gateway.state import FAILED, LIMITED, OK, Limits
from ragline.llm.base import GenParams
from ragline.llm.gateway import GatewayLLM
from ragline.testing import FakeUpstream
from ragline.types import Message
from tests.fixtures.redis_server import RedisServer

pytestmark = pytest.mark.slow

MSGS: list[Message] = [{"role": "user", "content": "What colour is the sky?"}]
P = GenParams(model="chat", max_tokens=8)


@pytest.fixture
async def state(redis_url: str) -> Any:
    """Upstream "a" past slow start (one call admitted and succeeded)."""
    s = RedisState(redis_url)
    assert (await s.acquire("a", Limits(), 1, "warm")).ok
    await s.settle("a", Limits(), "warm", OK)
    yield s
    await s.aclose()


async def test_rpm_in_redis(state: RedisState) -> None:
    lim = Limits(rpm=120, headroom=1.0)  # one per 0.5 s
    assert (await state.acquire("a", lim, 1, "l1")).ok
    v = await state.acquire("a", lim, 1, "l2")
    assert not v.ok and v.reason == "rpm" and 0.4 < v.wait_s <= 0.5
    await asyncio.sleep(v.wait_s + 0.01)
    assert (await state.acquire("a", lim, 1, "l3")).ok
    assert state.mode == "redis"


async def test_tpm_settles_with_the_reported_usage(state: RedisState) -> None:
    lim = Limits(tpm=60_000, headroom=1.0)  # 1 token/ms
    assert (await state.acquire("a", lim, 2000, "l1")).ok
    assert (await state.acquire("a", lim, 1, "l2")).reason == "tpm"
    await state.settle("a", lim, "l1", OK, charged=2000, used=10)
    await asyncio.sleep(0.02)
    assert (await state.acquire("a", lim, 1, "l3")).ok


async def test_in_flight_leases_are_shared_and_released(state: RedisState) -> None:
    lim = Limits(max_in_flight=2)
    assert (await state.acquire("a", lim, 1, "1")).ok
    assert (await state.acquire("a", lim, 1, "2")).ok
    assert (await state.acquire("a", lim, 1, "3")).reason == "busy"
    assert await state.in_flight(["a", "b"]) == [2, 0]
    await state.settle("a", lim, "1", OK)
    assert await state.in_flight(["a"]) == [1]
    assert (await state.acquire("a", lim, 1, "4")).ok


async def test_a_lease_of_a_dead_process_expires(state: RedisState) -> None:
    lim = Limits(max_in_flight=1, lease_s=0.3)
    assert (await state.acquire("a", lim, 1, "never-settled")).ok
    assert (await state.acquire("a", lim, 1, "2")).reason == "busy"
    await asyncio.sleep(0.35)
    assert (await state.acquire("a", lim, 1, "3")).ok


async def test_retry_after_floor_and_aimd_in_redis(state: RedisState) -> None:
    lim = Limits(rpm=6000)
    await state.settle("a", lim, "x", LIMITED, retry_after=0.3)
    await state.settle("a", lim, "y", LIMITED, retry_after=0.1)
    v = await state.acquire("a", lim, 1, "1")
    assert v.reason == "retry_after" and 0.2 < v.wait_s <= 0.3
    snap = await state.snapshot("a", lim)
    assert snap["rate_factor"] == 0.5 and snap["cooling_down_s"] > 0.2
    for i in range(10):
        await state.settle("a", lim, str(i), OK)
    assert (await state.snapshot("a", lim))["rate_factor"] == pytest.approx(0.7)


async def test_breaker_in_redis(state: RedisState) -> None:
    lim = Limits(breaker_failures=2, cooldown_s=0.3)
    assert await state.settle("a", lim, "1", FAILED) == ""
    assert await state.settle("a", lim, "2", FAILED) == "opened"
    assert (await state.acquire("a", lim, 1, "x")).reason == "open"
    await asyncio.sleep(0.31)
    probe = await state.acquire("a", lim, 1, "p")
    assert probe.ok and probe.probe
    assert (await state.acquire("a", lim, 1, "q")).reason == "open"
    assert (await state.snapshot("a", lim))["breaker"] == "half_open"
    assert await state.settle("a", lim, "p", OK, probe=True) == "closed"
    assert (await state.snapshot("a", lim))["breaker"] == "closed"


# ------------------------------------------------------------------------------ two gateways, one Redis


@pytest.fixture
def fakes() -> Iterator[list[FakeUpstream]]:
    with ExitStack() as stack:
        yield [stack.enter_context(FakeUpstream()) for _ in range(2)]


def gw(fakes: list[FakeUpstream], redis_url: str | None, **up: Any) -> GatewayLLM:
    ups = tuple(UpstreamSettings(base_url=f.url, model="chat", name=f"u{i}", **up) for i, f in enumerate(fakes))
    settings = GatewaySettings(
        upstreams=ups, redis_url=redis_url, breaker_failures=2, breaker_cooldown_s=30, headroom=1.0
    )
    return GatewayLLM(LLMSettings(provider="gateway", model="chat", gateway=settings))


async def test_a_rate_limit_holds_across_instances(fakes: list[FakeUpstream], redis_url: str) -> None:
    a, b = gw(fakes[:1], redis_url, rpm=300), gw(fakes[:1], redis_url, rpm=300)  # 5/s, shared
    t0 = time.monotonic()
    await asyncio.gather(*(x.complete(MSGS, P) for x in (a, b) for _ in range(5)))
    elapsed = time.monotonic() - t0
    assert fakes[0].calls == 10
    arrivals = sorted(t for t, *_ in fakes[0].arrivals())
    gaps = [y - x for x, y in itertools.pairwise(arrivals)]
    assert elapsed >= 1.75 and min(gaps) > 0.15  # 10 calls at 5/s between both instances: ≥ 1.8 s, spaced
    await a.aclose()
    await b.aclose()


async def test_an_open_breaker_is_shared(fakes: list[FakeUpstream], redis_url: str) -> None:
    fakes[0].configure(failure_rate=1.0, failure_kind="500")
    a, b = gw(fakes, redis_url), gw(fakes, redis_url)
    for _ in range(4):
        await a.complete(MSGS, P)
    assert fakes[0].calls == 2  # opened by instance a ...
    for _ in range(4):
        assert (await b.complete(MSGS, P)).upstream == "u1"
    assert fakes[0].calls == 2  # ... and instance b never calls it
    assert (await b.upstreams())["upstreams"][0]["breaker"] == "open"
    await a.aclose()
    await b.aclose()


async def test_least_busy_sees_the_other_instances_calls(fakes: list[FakeUpstream], redis_url: str) -> None:
    for f in fakes:
        f.configure(latency_ms=300)
    a, b = gw(fakes, redis_url), gw(fakes, redis_url)
    slow = asyncio.ensure_future(a.complete(MSGS, P))  # instance a keeps one upstream busy
    await asyncio.sleep(0.1)
    busy = next(u.name for u in a.gateway.upstreams if u.inflight)
    out = await b.complete(MSGS, P)
    assert out.upstream != busy  # instance b routed around a's call
    await slow
    await a.aclose()
    await b.aclose()


async def test_redis_going_away_fails_open_to_local_limits(
    fakes: list[FakeUpstream], redis_url: str, redis_server: RedisServer
) -> None:
    llm = gw(fakes[:1], redis_url, rpm=600)
    await llm.complete(MSGS, P)
    assert (await llm.upstreams())["state"] == "redis"
    redis_server.stop()
    try:
        t0 = time.monotonic()
        for _ in range(4):  # every request still answered, limited locally (10/s)
            assert (await llm.complete(MSGS, P)).text
        assert time.monotonic() - t0 >= 0.25
        snap = await llm.upstreams()
        assert snap["state"] == "local"
    finally:
        redis_server.start()
    await asyncio.sleep(1.1)  # the Redis breaker's probe interval
    await llm.complete(MSGS, P)
    await llm.complete(MSGS, P)
    assert (await llm.upstreams())["state"] == "redis"
    await llm.aclose()


async def test_after_a_retry_after_one_call_goes_first_in_redis(state: RedisState) -> None:
    lim = Limits()
    await state.settle("a", lim, "x", LIMITED, retry_after=0.1)
    await asyncio.sleep(0.11)
    assert (await state.acquire("a", lim, 1, "first")).ok
    assert (await state.acquire("a", lim, 1, "second")).reason == "single"
    await state.settle("a", lim, "other", OK)
    assert (await state.acquire("a", lim, 1, "still")).reason == "single"
    await state.settle("a", lim, "first", OK)
    assert (await state.acquire("a", lim, 1, "third")).ok


async def test_slow_start_in_redis(state: RedisState) -> None:
    assert (await state.acquire("fresh", Limits(), 1, "1")).ok
    assert (await state.acquire("fresh", Limits(), 1, "2")).reason == "single"
    await state.settle("fresh", Limits(), "1", OK)
    assert (await state.acquire("fresh", Limits(), 1, "3")).ok
    assert (await state.acquire("fresh", Limits(), 1, "4")).ok
