"""``@ragline.cached`` across two instances sharing a real redis-server (each with its own L1 and L3).

An entry computed through one instance is a hit on the other (L2); ``invalidate`` of one call and
``invalidate_function`` (every tenant: a new generation; one tenant: a prefix clear) on one instance reach the
other's L1 through the invalidation bus; concurrent identical calls on both instances run the function once
(the Redis single-flight lock).  Fast fakes stand in for the model (``ragline.testing``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ragline import AsyncRAG, Settings, cached
from ragline.testing import HashEmbedder, ScriptedLLM
from tests.integration.test_cache_multi_instance import wait_until

pytestmark = pytest.mark.slow

CALLS: list[tuple[str, int]] = []


async def lookup(tenant: str, x: int) -> dict[str, int]:
    """The user's function, decorated once per instance below (same qualified name: same entries)."""
    CALLS.append((tenant, x))
    await asyncio.sleep(0.05)
    return {"x": x, "double": 2 * x}


@pytest.fixture
async def pair(tmp_path: Path, redis_url: str) -> AsyncIterator[tuple[AsyncRAG, AsyncRAG]]:
    CALLS.clear()

    def settings(name: str) -> Settings:
        return Settings(data_dir=tmp_path / name, cache={"redis_url": redis_url})

    async with (
        AsyncRAG(settings("a"), embedder=HashEmbedder(), llm=ScriptedLLM()) as a,
        AsyncRAG(settings("b"), embedder=HashEmbedder(), llm=ScriptedLLM()) as b,
    ):
        assert a.cache is not None and b.cache is not None and a.cache.tiers.bus is not None
        yield a, b


async def test_entries_are_shared_and_invalidation_reaches_the_other_instance(pair: tuple[AsyncRAG, AsyncRAG]) -> None:
    a, b = pair
    on_a = cached(rag=a, tenant=lambda tenant, x: tenant, ttl=600)(lookup)
    on_b = cached(rag=b, tenant=lambda tenant, x: tenant, ttl=600)(lookup)

    assert await on_a("t1", 1) == {"x": 1, "double": 2}
    assert await on_b("t1", 1) == {"x": 1, "double": 2}  # B: from Redis, not computed again
    assert await on_b("t2", 1) == {"x": 1, "double": 2}
    assert await on_a("t2", 1) == {"x": 1, "double": 2}
    assert CALLS == [("t1", 1), ("t2", 1)]
    assert await on_a("t1", 1) == await on_b("t1", 1)  # now in both L1s
    assert CALLS == [("t1", 1), ("t2", 1)]

    # one call's entry, dropped on B: A's L1 copy goes through the bus, A recomputes
    await on_b.invalidate("t1", 1)
    await wait_until(lambda: _called_after(on_a, "t1", 1, 3), timeout=5)
    assert CALLS[2:] == [("t1", 1)]
    assert await on_b("t1", 1) == {"x": 1, "double": 2} and len(CALLS) == 3  # B reads A's new entry

    # the whole function, every tenant, dropped on A: B's L1 holds the old generation until the bus says
    await on_a.invalidate_function()
    await wait_until(lambda: _called_after(on_b, "t2", 1, 4), timeout=5)
    assert CALLS[3:] == [("t2", 1)]
    await on_a("t2", 1)  # A reads B's entry under the new generation
    await on_a("t1", 1)  # t1 under the new generation: computed once
    await on_b("t1", 1)
    assert CALLS[3:] == [("t2", 1), ("t1", 1)]

    # one tenant's entries, dropped on B (a prefix clear in Redis, and in A's L1 through the bus)
    await on_b.invalidate_function(tenant="t1")
    await wait_until(lambda: _called_after(on_a, "t1", 1, 6), timeout=5)
    await on_a("t2", 1), await on_b("t2", 1)  # t2 untouched
    assert CALLS[5:] == [("t1", 1)]


async def test_concurrent_identical_calls_on_two_instances_run_once(pair: tuple[AsyncRAG, AsyncRAG]) -> None:
    a, b = pair
    on_a = cached(rag=a, ttl=600)(lookup)
    on_b = cached(rag=b, ttl=600)(lookup)
    results = await asyncio.gather(*(f("t", 7) for f in (on_a, on_b) * 5))
    assert results == [{"x": 7, "double": 14}] * 10
    assert CALLS == [("t", 7)]  # one instance held the Redis lock, the other polled for its value


async def test_a_sync_function_shares_entries_across_instances(pair: tuple[AsyncRAG, AsyncRAG]) -> None:
    a, b = pair
    seen: list[int] = []

    def square(x: int) -> int:
        seen.append(x)
        return x * x

    sq_a, sq_b = cached(rag=a)(square), cached(rag=b)(square)
    assert await asyncio.to_thread(sq_a, 9) == 81
    await asyncio.sleep(0.2)  # a sync call does not wait for its write
    assert await asyncio.to_thread(sq_b, 9) == 81 and seen == [9]
    await asyncio.to_thread(sq_b.invalidate_function)
    await wait_until(lambda: asyncio.to_thread(lambda: sq_a(9) == 81 and len(seen) >= 2), timeout=5)
    assert seen == [9, 9]


async def _called_after(fn: object, tenant: str, x: int, n: int) -> bool:
    """Call ``fn(tenant, x)``; True once the function has run ``n`` times in all."""
    await fn(tenant, x)  # type: ignore[operator]
    return len(CALLS) >= n
