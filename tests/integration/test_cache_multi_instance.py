"""Several instances sharing one Redis (DESIGN.md §3.1, §6), against a real redis-server.

* :class:`RedisDependencyIndex` passes the same contract as the SQLite index
  (tests/unit/test_deps.py), shares records between instances, tolerates
  records that expired, and fails open towards dropping more.
* Two :class:`AsyncRAG` instances with their own data dirs (own L1, L3 and
  embedded store) and one Redis: an ingest on one invalidates what the other
  cached, in L2 and, through pub/sub, in the other's L1.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from ragline.cache.deps import DepsIndex
from ragline.cache.deps_redis import RedisDependencyIndex
from ragline.cache.marks import is_marked
from ragline.config import Settings
from ragline.embed.local import LocalEmbedder
from ragline.pipeline import AsyncRAG
from ragline.types import Document
from tests.fixtures.redis_server import RedisServer
from tests.integration.test_cache_pipeline import DOCS
from tests.unit.test_deps import CONTRACT, E0, E1, keys_of, later, rec

pytestmark = pytest.mark.slow

PARIS_V2 = Document(
    "paris",
    "Paris is the capital of France. The Eiffel Tower was completed in March 1889 for the World's Fair.",
    title="Paris",
)
Q = "When was the Eiffel Tower completed?"
CATS = "How long do cats sleep?"


async def wait_until(pred: Callable[[], Any], timeout: float, step: float = 0.02) -> None:
    """Await ``pred()`` (sync or async) until truthy, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        res = pred()
        if asyncio.iscoroutine(res):
            res = await res
        if res:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(step)


# ------------------------------------------------------------------ the index on its own


@pytest.fixture
async def make_index(redis_url: str, tmp_path: Path) -> AsyncIterator[Callable[..., RedisDependencyIndex]]:
    made: list[RedisDependencyIndex] = []

    def make(name: str = "a", url: str | None = None, **kw: Any) -> RedisDependencyIndex:
        opts: dict[str, Any] = {"reset_s": 0.1}
        opts.update(kw)
        idx = RedisDependencyIndex(url or redis_url, tmp_path / name / "deps.sqlite3", **opts)
        made.append(idx)
        return idx

    yield make
    for idx in made:
        await idx.close()


@pytest.mark.parametrize("check", CONTRACT, ids=lambda f: f.__name__)
async def test_redis_contract(
    check: Callable[[DepsIndex], Awaitable[None]], make_index: Callable[..., RedisDependencyIndex]
) -> None:
    idx = make_index()
    await check(idx)
    assert await idx.local.count() == 0  # with Redis up, nothing is kept locally


async def test_records_are_shared_between_instances(make_index: Callable[..., RedisDependencyIndex]) -> None:
    x, y = make_index("x"), make_index("y")
    r = rec("a", cands=("c1",), terms=("alpha",), vec=E0, dc=None)
    assert await x.add(r, later()) is True
    k = r.entry_key
    assert await y.by_chunks("t1", ["c1"]) == {k}
    assert await y.by_terms("t1", ["alpha"]) == {k}
    assert keys_of(await y.records("t1", [k])) == {k}
    assert await y.dense_entered("t1", E0[None, :]) == {k}
    assert await y.tenant_keys("t1") == [k] and await y.all_keys() == [k] and await y.count() == 1
    # y's query-vector matrix is reused until some instance changes the tenant's records,
    # then refreshed with just the records that changed
    refreshes, fetched = y.dense_refreshes, y.dense_records_fetched
    assert await y.dense_entered("t1", E1[None, :]) == {k}
    assert (y.dense_refreshes, y.dense_records_fetched) == (refreshes, fetched)
    r2 = rec("b", cands=("c2",), vec=E1, dc=0.9)
    await x.add(r2, later())
    assert await y.dense_entered("t1", E1[None, :]) == {k, r2.entry_key}
    assert (y.dense_refreshes, y.dense_records_fetched) == (refreshes + 1, fetched + 1)
    # a refreshed record keeps its key but may change its cutoff: y must see the new one
    await x.add(rec("b", cands=("c2",), vec=E1, dc=None), later())
    assert await y.dense_entered("t1", E0[None, :]) == {k, r2.entry_key}
    assert (y.dense_refreshes, y.dense_records_fetched) == (refreshes + 2, fetched + 2)
    # a remove on one instance is seen by the other
    await y.remove([k])
    assert await x.by_chunks("t1", ["c1"]) == set()
    assert await x.dense_entered("t1", E0[None, :]) == {r2.entry_key}  # its list is not full: anything enters
    assert await x.records("t1", [k]) == []
    assert await x.local.count() == await y.local.count() == 0


async def test_expired_records_are_skipped_and_pruned(
    make_index: Callable[..., RedisDependencyIndex], redis_url: str
) -> None:
    idx = make_index(ttl_grace_s=0.0)
    short = rec("short", cands=("c1",), terms=("alpha",), vec=E0, dc=None)
    long = rec("long", cands=("c1",), terms=("alpha",), vec=E1, dc=None)
    await idx.add(short, time.time() + 0.3)
    await idx.add(long, later())
    assert await idx.dense_entered("t1", E0[None, :]) == {short.entry_key, long.entry_key}  # matrix now cached
    await asyncio.sleep(0.5)  # Redis expires the short record; the sets live on (the long one keeps them)
    assert await idx.by_chunks("t1", ["c1"]) == {long.entry_key}
    assert await idx.by_terms("t1", ["alpha"]) == {long.entry_key}
    assert keys_of(await idx.records("t1", [short.entry_key, long.entry_key])) == {long.entry_key}
    assert await idx.dense_entered("t1", E0[None, :]) == {long.entry_key}  # the cached matrix is checked too
    assert await idx.tenant_keys("t1") == [long.entry_key]
    raw = redis.Redis.from_url(redis_url)
    try:  # the stale memberships were removed when met
        root = "rl:v1:t1:dep:"
        for s in ("chunk:c1", "term:alpha"):
            assert raw.smembers(root + s) == {long.entry_key.encode()}, s
        assert raw.hkeys(root + "all") == [long.entry_key.encode()]
        assert 0 < raw.pttl(root + "chunk:c1") <= 3600 * 1000  # a set lives as long as its longest record
    finally:
        raw.close()


async def test_unreachable_redis_falls_back_locally_then_hands_over(
    make_index: Callable[..., RedisDependencyIndex], redis_server: RedisServer
) -> None:
    idx = make_index()
    shared = rec("shared", cands=("c1",), vec=E0, dc=None)
    assert await idx.add(shared, later()) is True
    redis_server.stop()
    local = rec("local", cands=("c1",), vec=E1, dc=None)
    assert await idx.add(local, later()) is False  # not visible to other instances: the caller keeps it local
    assert await idx.local_only(local.entry_key) and idx.has_local_only
    failures = idx.lookup_failures
    assert await idx.by_chunks("t1", ["c1"]) == {local.entry_key}  # what this instance knows ...
    assert idx.lookup_failures > failures  # ... and that it is not everything
    assert keys_of(await idx.records("t1", [shared.entry_key, local.entry_key])) == {local.entry_key}
    assert await idx.dense_entered("t1", E1[None, :]) == {local.entry_key}
    assert await idx.take_local_only() == []  # still unreachable: keep them
    redis_server.start()
    deadline = time.monotonic() + 3
    taken: list[str] = []
    while not taken and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        taken = await idx.take_local_only()
    assert taken == [local.entry_key]
    assert not idx.has_local_only and not await idx.local_only(local.entry_key)
    failures = idx.lookup_failures
    assert await idx.by_chunks("t1", ["c1"]) == set()  # the restarted Redis (no persistence) is empty
    assert idx.lookup_failures == failures


# ------------------------------------------------------------------ AsyncRAG instances


def instance_settings(
    make_settings: Callable[..., Settings], tmp_path: Path, name: str, redis_url: str, **cache: Any
) -> Settings:
    return make_settings(
        data_dir=tmp_path / name,
        cache={"enabled": True, "redis_url": redis_url, **cache},
        retrieval={"k": 2, "candidates": 3},
        context={"max_sources": 2},
    )


async def test_ingest_on_one_instance_invalidates_what_another_cached(
    make_settings: Callable[..., Settings], embedder: LocalEmbedder, redis_url: str, tmp_path: Path
) -> None:
    sa = instance_settings(make_settings, tmp_path, "a", redis_url)
    sb = instance_settings(make_settings, tmp_path, "b", redis_url)
    async with AsyncRAG(sa, embedder=embedder) as a, AsyncRAG(sb, embedder=embedder) as b:
        assert a.cache is not None and b.cache is not None
        assert isinstance(a.cache.deps, RedisDependencyIndex) and isinstance(b.cache.deps, RedisDependencyIndex)
        for bus in (a.cache.tiers.bus, b.cache.tiers.bus):
            assert bus is not None and await bus.wait_connected()
        await a.ingest(DOCS)
        await b.ingest(DOCS)

        first = await b.ask(Q)  # written by B: B's L1/L3, the shared L2, the shared dependency records
        assert first.cache.kind == "miss" and "paris" in {s.doc_id for s in first.sources}
        assert (await b.ask(CATS)).cache.kind == "miss"
        key = b.cache.answer_key("default", Q, sb.retrieval.k, [])
        assert b.cache.tiers.l1 is not None and key in b.cache.tiers.l1

        shared = await a.ask(Q)  # A never computed it: L1 miss, L2 hit
        assert (shared.cache.kind, shared.cache.tier) == ("exact", "l2")
        assert shared.text == first.text

        report = await a.ingest([PARIS_V2])  # A alone learns that the document changed
        assert report.updated == 1
        l2 = a.cache.tiers.tier("l2")
        assert l2 is not None and await l2.get_many([key]) == {}  # A deleted B's entry from L2
        # the pub/sub event reaches B, which drops the key from its L1 and then (in a worker
        # thread) from its L3: wait until both are done
        b_l1, b_l3 = b.cache.tiers.l1, b.cache.tiers.tier("l3")
        assert b_l3 is not None

        async def dropped_on_b() -> bool:
            return key not in b_l1 and await b_l3.get_many([key]) == {}

        await wait_until(dropped_on_b, timeout=2.0)
        again = await b.ask(Q)
        assert again.cache.kind != "exact"
        # what the change cannot affect stays cached on B
        cats = await b.ask(CATS)
        assert (cats.cache.kind, cats.cache.tier) == ("exact", "l1")


async def test_a_mark_travels_to_every_instance_and_one_reverification_clears_it(
    make_settings: Callable[..., Settings], embedder: LocalEmbedder, redis_url: str, tmp_path: Path
) -> None:
    def one_source(name: str) -> Settings:  # the answer rests on one chunk: the cats document
        return make_settings(
            data_dir=tmp_path / name,
            cache={"enabled": True, "redis_url": redis_url},
            retrieval={"k": 1, "candidates": 3},
            context={"max_sources": 1},
        )

    sa, sb = one_source("a"), one_source("b")
    async with AsyncRAG(sa, embedder=embedder) as a, AsyncRAG(sb, embedder=embedder) as b:
        assert a.cache is not None and b.cache is not None
        for bus in (a.cache.tiers.bus, b.cache.tiers.bus):
            assert bus is not None and await bus.wait_connected()
        await a.ingest(DOCS)
        await b.ingest(DOCS)
        assert (await b.ask(CATS)).cache.kind == "miss"
        assert (await a.ask(CATS)).cache.tier == "l2"  # now in A's L1, B's L1 and the shared L2
        key = b.cache.answer_key("default", CATS, sb.retrieval.k, [])
        l2 = a.cache.tiers.tier("l2")
        assert l2 is not None
        # the same corpus change on both stores (one corpus; each instance has its own store here):
        # it shares the query's terms but cannot enter its context, so the answer is marked, not dropped
        naps = Document("naps", "Some people sleep badly after long flights.", title="Travel")
        await a.ingest([naps])
        await b.ingest([naps])
        assert a.cache.counter("invalidation_marked") >= 1 and b.cache.counter("invalidation_marked") >= 1
        assert is_marked((await l2.get_many([key]))[key])  # marked in the shared tier, in place
        a_l1 = a.cache.tiers.l1
        assert a_l1 is not None
        await wait_until(lambda: key not in a_l1, timeout=2.0)  # B's mark event dropped A's local copy

        served = await b.ask(CATS)  # B re-verifies (retrieval from the stored vector) and clears the mark
        assert served.cache.kind == "exact" and b.cache.counter("reverify_kept") == 1
        assert not is_marked((await l2.get_many([key]))[key])
        await wait_until(lambda: key not in a_l1, timeout=2.0)
        on_a = await a.ask(CATS)  # A reads the cleared value: no second re-verification
        assert (on_a.cache.kind, on_a.cache.tier) == ("exact", "l2") and on_a.text == served.text
        assert a.cache.counter("reverify_on_read") == 0


async def test_redis_outage_during_ingest_drops_more_not_less(
    make_settings: Callable[..., Settings],
    embedder: LocalEmbedder,
    redis_url: str,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    settings = instance_settings(make_settings, tmp_path, "a", redis_url)
    async with AsyncRAG(settings, embedder=embedder) as rag:
        assert rag.cache is not None
        await rag.ingest(DOCS)
        await rag.ask(Q)
        await rag.ask(CATS)
        assert (await rag.ask(CATS)).cache.kind == "exact"
        redis_server.stop()
        failures = rag.cache.deps.lookup_failures
        # unrelated to both answers: with the shared records it would keep them (see
        # test_cache_pipeline.test_update_invalidates_only_dependents); without them it cannot know
        rep = await rag.ingest([Document("jazz", "Jazz originated in New Orleans in the early twentieth century.")])
        assert rep.added == 1  # the document is never lost
        assert rag.cache.deps.lookup_failures > failures
        assert (await rag.ask(CATS)).cache.kind == "miss"
        assert (await rag.ask(Q)).cache.kind == "miss"
        # still caching, locally only, while Redis is down
        key = rag.cache.answer_key("default", CATS, settings.retrieval.k, [])
        assert await rag.cache.deps.local_only(key)
        hit = await rag.ask(CATS)
        assert (hit.cache.kind, hit.cache.tier) == ("exact", "l1")


async def test_entries_cached_while_the_shared_index_is_down_stay_local_and_go_on_recovery(
    make_settings: Callable[..., Settings],
    embedder: LocalEmbedder,
    redis_url: str,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    """A partial outage: L2 is reachable, the dependency index's Redis is not (a second, real server)."""
    deps_server = RedisServer(redis_server.exe, tmp_path)
    deps_server.start()
    settings = instance_settings(make_settings, tmp_path, "a", redis_url)
    raw = redis.Redis.from_url(redis_url)
    try:
        async with AsyncRAG(settings, embedder=embedder) as rag:
            assert rag.cache is not None
            await rag.cache.deps.close()
            deps = RedisDependencyIndex(deps_server.url, settings.data_dir / "cache" / "deps.sqlite3", reset_s=0.1)
            rag.cache.deps = deps
            await rag.ingest(DOCS)
            key = rag.cache.answer_key("default", Q, settings.retrieval.k, [])
            deps_server.stop()
            assert (await rag.ask(Q)).cache.kind == "miss"
            assert await deps.local_only(key)
            assert raw.get(key) is None  # no other instance could invalidate it there: not in L2
            assert rag.cache.tiers.l1 is not None and key in rag.cache.tiers.l1
            hit = await rag.ask(Q)
            assert (hit.cache.kind, hit.cache.tier) == ("exact", "l1")
            deps_server.start()
            # once the index answers again, the entry only this instance could invalidate goes
            l1 = rag.cache.tiers.l1
            await wait_until(lambda: key not in l1, timeout=5.0)
            assert not deps.has_local_only
            fresh = await rag.ask(Q)
            assert fresh.cache.kind == "miss" and not await deps.local_only(key)
            assert raw.get(key) is not None  # now shared again: L2 and the shared records
            assert await deps.by_chunks("default", [s.chunk_id for s in fresh.sources]) >= {key}
    finally:
        raw.close()
        deps_server.stop()


async def test_an_answer_cached_on_one_instance_enters_the_others_semantic_index(
    make_settings: Callable[..., Settings], embedder: LocalEmbedder, redis_url: str, tmp_path: Path
) -> None:
    sa = instance_settings(make_settings, tmp_path, "a", redis_url, semantic=True)
    sb = instance_settings(make_settings, tmp_path, "b", redis_url, semantic=True)
    async with AsyncRAG(sa, embedder=embedder) as a, AsyncRAG(sb, embedder=embedder) as b:
        assert a.cache is not None and b.cache is not None
        for bus in (a.cache.tiers.bus, b.cache.tiers.bus):
            assert bus is not None and await bus.wait_connected()
        for rag in (a, b):
            await rag.ingest(DOCS)
        before = len(b.cache.semantic)
        assert (await a.ask(Q)).cache.kind == "miss"
        key = a.cache.answer_key("default", Q, sa.retrieval.k, [])
        await wait_until(lambda: len(b.cache.semantic) > before, timeout=2.0)  # announced over pub/sub
        qvec = embedder.embed([Q])[0]
        found = b.cache.semantic.candidates("default", b.cache.fingerprint, qvec, 0.9)
        assert key in {c.answer_key for c in found}
