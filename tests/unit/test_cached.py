"""``@ragline.cached`` on ragline's tiers (L1 + L3 here; the Redis case is tests/integration/test_cached_redis.py).

Hit, TTL expiry (injected L1 clock, L3 off), tenant separation, invalidation of one call and of a whole
function, sync and async functions, single-flight, key canonicalisation, refusals, and the bindings
(``rag.cached``, the module default, ``rag=``, a disabled cache)."""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import ragline
from ragline import AsyncRAG, Settings, cached
from ragline.cache.functions import FunctionCache, canonical_arg
from ragline.errors import ConfigError, InvalidInput
from ragline.testing import HashEmbedder, ScriptedLLM


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", cache={"redis_url": None})


@pytest.fixture
async def rag(settings: Settings) -> AsyncIterator[AsyncRAG]:
    async with AsyncRAG(settings, embedder=HashEmbedder(), llm=ScriptedLLM()) as r:
        yield r


@pytest.fixture
async def l1_only(tmp_path: Path) -> AsyncIterator[tuple[FunctionCache, Clock]]:
    """A standalone FunctionCache with only L1, whose clock the test moves."""
    s = Settings(data_dir=tmp_path / "fc", cache={"redis_url": None, "l3_enabled": False})
    async with FunctionCache.from_settings(s) as fc:
        assert fc.tiers.l1 is not None
        clock = Clock()
        fc.tiers.l1._clock = clock
        yield fc, clock


async def test_async_hit_returns_the_stored_value_without_calling_again(rag: AsyncRAG) -> None:
    calls: list[int] = []

    @rag.cached(ttl=60)
    async def square(x: int) -> dict[str, int]:
        calls.append(x)
        return {"x": x, "sq": x * x}

    assert await square(3) == {"x": 3, "sq": 9}
    assert await square(3) == {"x": 3, "sq": 9}
    assert await square(x=3) == {"x": 3, "sq": 9}  # bound to the signature: the same call
    assert await square(4) == {"x": 4, "sq": 16}
    assert calls == [3, 4] and square.computed == 2
    first, second = await square(3), await square(3)
    first["x"] = 99
    assert second["x"] == 3  # every caller gets its own decoded copy


async def test_sync_function_from_a_thread(rag: AsyncRAG) -> None:
    calls: list[tuple[int, str]] = []

    @rag.cached
    def pair(n: int, label: str = "a") -> list[Any]:
        calls.append((n, label))
        return [n, label]

    assert await asyncio.to_thread(pair, 1) == [1, "a"]
    assert await asyncio.to_thread(pair, 1, "a") == [1, "a"]  # the default made explicit: same key
    assert await asyncio.to_thread(pair, 1, label="b") == [1, "b"]
    assert calls == [(1, "a"), (1, "b")]
    with pytest.raises(TypeError, match="event loop thread"):  # would block the loop the cache runs on
        pair(1)
    await asyncio.to_thread(pair.invalidate, 1)
    assert await asyncio.to_thread(pair, 1) == [1, "a"]
    assert calls == [(1, "a"), (1, "b"), (1, "a")]


async def test_ttl_expiry_with_an_injected_clock(l1_only: tuple[FunctionCache, Clock]) -> None:
    fc, clock = l1_only
    calls: list[int] = []

    @cached(ttl=30, rag=fc)
    async def f(x: int) -> int:
        calls.append(x)
        return x

    @cached(rag=fc)  # no ttl: cache.ttls.function
    async def g(x: int) -> int:
        calls.append(-x)
        return x

    assert fc.default_ttl_s == Settings().cache.ttls.function == 3600.0
    await f(1), await g(1)
    clock.now += 29
    await f(1), await g(1)
    assert calls == [1, -1]
    clock.now += 2  # 31 s: f's entry expired, g's (1 h) not
    await f(1), await g(1)
    assert calls == [1, -1, 1]
    clock.now += 3600
    await g(1)
    assert calls == [1, -1, 1, -1]


async def test_ttl_expiry_in_real_time_on_l1_and_l3(rag: AsyncRAG) -> None:
    calls: list[int] = []

    @rag.cached(ttl=0.3)
    async def f(x: int) -> int:
        calls.append(x)
        return x

    await f(1)
    await f(1)
    assert calls == [1]
    await asyncio.sleep(0.45)
    await f(1)
    assert calls == [1, 1]


async def test_tenants_are_separate(rag: AsyncRAG) -> None:
    calls: list[tuple[str, str]] = []

    @rag.cached(tenant=lambda tenant, q: tenant)
    async def per_tenant(tenant: str, q: str) -> str:
        calls.append((tenant, q))
        return f"{tenant}:{q}"

    @rag.cached(tenant="acme")
    async def acme(q: str) -> str:
        return q

    assert await per_tenant("t1", "q") == "t1:q"
    assert await per_tenant("t2", "q") == "t2:q"
    assert await per_tenant("t1", "q") == "t1:q"
    assert calls == [("t1", "q"), ("t2", "q")]
    await per_tenant.invalidate_function(tenant="t1")  # one tenant's entries: a prefix clear
    await per_tenant("t1", "q"), await per_tenant("t2", "q")
    assert calls == [("t1", "q"), ("t2", "q"), ("t1", "q")]
    await rag.invalidate(tenant="t2")  # a tenant's invalidation covers its function entries too
    await per_tenant("t2", "q")
    assert calls[-1] == ("t2", "q") and len(calls) == 4
    with pytest.raises(InvalidInput, match="tenant"):
        await per_tenant("no:colons", "q")
    with pytest.raises(InvalidInput, match="tenant"):
        cached(tenant="bad tenant")
    assert await acme("x") == "x"


async def test_invalidate_one_call_and_the_whole_function(rag: AsyncRAG) -> None:
    calls: list[str] = []

    @rag.cached
    async def f(q: str) -> str:
        calls.append(q)
        return q.upper()

    await f("a"), await f("b")
    await f.invalidate("a")
    await f("a"), await f("b")
    assert calls == ["a", "b", "a"]
    await ragline.invalidate_function(f)  # every tenant: a new generation
    await f("a"), await f("b")
    assert calls == ["a", "b", "a", "a", "b"]
    await f("a")
    assert calls.count("a") == 3


def test_sync_invalidation_from_a_sync_rag(settings: Settings) -> None:
    with ragline.RAG(settings, embedder=HashEmbedder(), llm=ScriptedLLM()) as rag:
        calls: list[int] = []

        @rag.cached(ttl=60)
        def f(x: int) -> int:
            calls.append(x)
            return x * 2

        @rag.cached(ttl=60)
        async def af(x: int) -> int:  # an async function in the caller's own loop, cache on the RAG's
            calls.append(-x)
            return x * 3

        assert (f(2), f(2)) == (4, 4)
        f.invalidate(2)
        assert f(2) == 4
        f.invalidate_function()
        assert f(2) == 4
        assert calls == [2, 2, 2]

        async def use_async() -> list[int]:
            out = [await af(5), await af(5)]
            await af.invalidate_function()
            return [*out, await af(5)]

        assert asyncio.run(use_async()) == [15, 15, 15]
        assert calls == [2, 2, 2, -5, -5]


async def test_single_flight_async(rag: AsyncRAG) -> None:
    started = 0

    @rag.cached
    async def slow(x: int) -> int:
        nonlocal started
        started += 1
        await asyncio.sleep(0.05)
        return x

    assert await asyncio.gather(*(slow(7) for _ in range(20)), slow(8)) == [7] * 20 + [8]
    assert started == 2


async def test_single_flight_sync_threads(rag: AsyncRAG) -> None:
    started = 0
    lock = threading.Lock()

    @rag.cached
    def slow(x: int) -> int:
        nonlocal started
        with lock:
            started += 1
        time.sleep(0.1)
        return x

    out = await asyncio.gather(*(asyncio.to_thread(slow, 3) for _ in range(6)))
    assert out == [3] * 6 and started == 1


async def test_an_exception_is_not_cached_and_reaches_every_joined_caller(rag: AsyncRAG) -> None:
    calls = 0

    @rag.cached
    async def boom(x: int) -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        raise RuntimeError("upstream down")

    results = await asyncio.gather(boom(1), boom(1), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results) and calls == 1
    with pytest.raises(RuntimeError):
        await boom(1)
    assert calls == 2


class Color(enum.Enum):
    RED = "red"


def test_canonical_arguments_are_type_tagged_and_refuse_unhashable_values() -> None:
    enc = [
        canonical_arg(v, "x")
        for v in (1, 1.0, True, "1", None, b"1", (1, "a"), frozenset({2, 1}), Color.RED, 2**70, float("nan"))
    ]
    assert len({repr(e) for e in enc}) == len(enc)
    assert canonical_arg(frozenset({1, 2}), "x") == canonical_arg(frozenset({2, 1}), "x")
    for bad in ([1], {"a": 1}, {1}, object()):
        with pytest.raises(TypeError, match="cannot be part of a cache key"):
            canonical_arg(bad, "argument 'q'")


async def test_refusals_are_clear_type_errors(rag: AsyncRAG) -> None:
    calls = 0

    @rag.cached
    async def f(q: Any) -> Any:
        nonlocal calls
        calls += 1
        return q

    with pytest.raises(TypeError, match=r"argument 'q' \(list, unhashable\)"):
        await f([1, 2])
    assert calls == 0  # refused before the function ran
    with pytest.raises(TypeError, match="is a tuple: @cached stores JSON"):
        await f((1, 2))  # a tuple argument is fine, a tuple result is not (a hit would return a list)
    with pytest.raises(TypeError, match="not JSON"):
        await f(float("inf"))
    with pytest.raises(TypeError, match="f\\(\\)"):
        await f(1, 2)  # type: ignore[call-arg]
    assert await f("ok") == "ok"

    @rag.cached(key=lambda items: tuple(sorted(items)))  # key= makes unhashable arguments usable
    async def total(items: list[int]) -> int:
        nonlocal calls
        calls += 1
        return sum(items)

    before = calls
    assert await total([2, 1]) == 3 and await total([1, 2]) == 3
    assert calls == before + 1
    with pytest.raises(ValueError, match="ttl"):
        cached(ttl=0)


async def test_bindings_default_explicit_disabled_and_closed(tmp_path: Path) -> None:
    @cached
    async def f(x: int) -> int:
        return x

    s = Settings(data_dir=tmp_path / "a", cache={"redis_url": None})
    async with AsyncRAG(s, embedder=HashEmbedder(), llm=ScriptedLLM()) as rag:
        assert await f(1) == 1  # the started AsyncRAG is the module default
        assert rag.function_cache is not None and rag.function_cache.tiers is rag.cache.tiers  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match=r"no cache for @ragline\.cached"):
        await f(1)  # closed: unbound
    off = Settings(data_dir=tmp_path / "b", cache={"enabled": False})
    disabled = AsyncRAG(off, embedder=HashEmbedder(), llm=ScriptedLLM())

    calls = 0

    @cached(rag=disabled)
    async def g(x: int) -> int:
        nonlocal calls
        calls += 1
        return x

    with pytest.raises(ConfigError, match="not started"):
        await g(1)
    async with disabled:
        assert (await g(1), await g(1)) == (1, 1)
        assert calls == 2  # cache.enabled: false runs the function uncached
    with pytest.raises(ConfigError, match="not started"):
        await g(1)


def test_method_with_a_key_function(tmp_path: Path) -> None:
    with ragline.RAG(
        Settings(data_dir=tmp_path / "d", cache={"redis_url": None}), embedder=HashEmbedder(), llm=ScriptedLLM()
    ) as rag:

        class Catalog:
            def __init__(self) -> None:
                self.calls = 0

            @rag.cached(key=lambda self, sku: sku)
            def price(self, sku: str) -> float:
                self.calls += 1
                return 9.5

        c = Catalog()
        assert c.price("A") == 9.5 and c.price("A") == 9.5 and c.calls == 1
