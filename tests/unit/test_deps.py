"""Semantics of the dependency index (DESIGN.md §3.1) on the single-instance SQLite backend.

The ``CONTRACT`` checks take a freshly created, empty index and are shared with
tests/integration/test_cache_multi_instance.py, which runs the very same checks
against :class:`~ragline.cache.deps_redis.RedisDependencyIndex` on a real redis-server.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest

from ragline.cache.deps import DepRecord, DepsIndex
from ragline.cache.deps_sqlite import DependencyIndex
from ragline.cache.keys import make_key

DIM = 4


def unit(*xs: float) -> np.ndarray:
    v = np.asarray(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


E0, E1, E2, E3 = (unit(*row) for row in np.eye(DIM))


def key(name: str, tenant: str = "t1") -> str:
    return make_key(tenant, "answer", name)


def rec(
    name: str,
    tenant: str = "t1",
    *,
    cands: tuple[str, ...] = ("c1", "c2"),
    ctx: tuple[str, ...] = ("c1",),
    terms: tuple[str, ...] = ("eiffel", "tower"),
    vec: np.ndarray = E0,
    dc: float | None = 0.5,
    kc: float | None = 1.5,
    entry_key: str | None = None,
) -> DepRecord:
    return DepRecord(
        entry_key or key(name, tenant),
        tenant,
        f"query {name}",
        vec,
        terms,
        cands,
        ctx,
        dc,
        kc,
        k=4,
        mmr=True,
        extra_keys=(f"extra-{name}",),
        doc_level=False,
        candidates=8,
    )


def later(s: float = 3600.0) -> float:
    return time.time() + s


def keys_of(recs: list[DepRecord]) -> set[str]:
    return {r.entry_key for r in recs}


# ------------------------------------------------------------------ the shared contract


async def check_add_and_lookups(idx: DepsIndex) -> None:
    r1 = rec("a", cands=("c1", "c2"), terms=("alpha", "beta"))
    r2 = rec("b", cands=("c2", "c3"), terms=("beta", "gamma"), ctx=("c3", "c2"), dc=None, kc=None)
    r3 = rec("c", tenant="t2", cands=("c1",), terms=("alpha",))
    for r in (r1, r2, r3):
        assert await idx.add(r, later()) is True
    k1, k2, k3 = r1.entry_key, r2.entry_key, r3.entry_key
    assert await idx.by_chunks("t1", ["c1"]) == {k1}
    assert await idx.by_chunks("t1", ["c2"]) == {k1, k2}
    assert await idx.by_chunks("t1", ["c1", "c3"]) == {k1, k2}
    assert await idx.by_chunks("t1", ["nope"]) == set()
    assert await idx.by_chunks("t1", []) == set()
    assert await idx.by_chunks("t2", ["c1", "c2"]) == {k3}  # tenants never mix
    assert await idx.by_terms("t1", ["alpha"]) == {k1}
    assert await idx.by_terms("t1", {"beta", "gamma"}) == {k1, k2}
    assert await idx.by_terms("t1", []) == set()
    assert await idx.by_terms("t2", ["gamma"]) == set()

    got = {r.entry_key: r for r in await idx.records("t1", [k1, k2, key("missing")])}
    assert set(got) == {k1, k2}
    g2 = got[k2]
    assert (g2.tenant, g2.query, g2.terms, g2.candidate_ids, g2.context_ids) == (
        "t1",
        "query b",
        ("beta", "gamma"),
        ("c2", "c3"),
        ("c3", "c2"),
    )
    assert (g2.dense_cutoff, g2.keyword_cutoff, g2.k, g2.mmr, g2.extra_keys, g2.doc_level, g2.candidates) == (
        None,
        None,
        4,
        True,
        ("extra-b",),
        False,
        8,
    )
    assert got[k1].dense_cutoff == 0.5 and got[k1].keyword_cutoff == 1.5
    np.testing.assert_array_equal(got[k1].qvec, E0)
    assert await idx.records("t2", [k1]) == []  # another tenant's key is not visible
    assert await idx.records("t1", []) == []

    assert set(await idx.tenant_keys("t1")) == {k1, k2}
    assert set(await idx.tenant_keys("t2")) == {k3}
    assert set(await idx.tenant_keys("t3")) == set()
    assert set(await idx.all_keys()) == {k1, k2, k3}
    assert await idx.count() == 3
    assert idx.known_count() == 3  # without I/O: what the last count saw


async def check_dense_entered(idx: DepsIndex) -> None:
    a = rec("a", vec=E0, dc=0.8)
    b = rec("b", vec=E1, dc=None)  # list not full: any new chunk enters
    c = rec("c", vec=E2, dc=0.95)
    edge = rec("edge", vec=E3, dc=0.6)
    for r in (a, b, c, edge):
        await idx.add(r, later())
    near_e0 = unit(1.0, 0.0, 0.1, 0.0)[None, :]  # cos(e0) ≈ 0.995, cos(e2) ≈ 0.0995
    assert await idx.dense_entered("t1", near_e0) == {a.entry_key, b.entry_key}
    assert await idx.dense_entered("t1", near_e0) == {a.entry_key, b.entry_key}  # cached matrix, same answer
    at_cutoff = np.asarray([[0.0, 0.8, 0.0, 0.6]], dtype=np.float32)  # cos(e3) = 0.6 exactly: enters
    assert await idx.dense_entered("t1", at_cutoff) == {b.entry_key, edge.entry_key}
    both = np.stack([E2, E0])  # any of the batch's vectors is enough
    assert await idx.dense_entered("t1", both) == {a.entry_key, b.entry_key, c.entry_key}
    assert await idx.dense_entered("t1", np.zeros((0, DIM), np.float32)) == set()
    assert await idx.dense_entered("t2", near_e0) == set()
    # the matrix follows adds and removes
    await idx.remove([a.entry_key])
    assert await idx.dense_entered("t1", near_e0) == {b.entry_key}
    d = rec("d", vec=unit(1.0, 0.0, 0.0, 0.05), dc=0.9)
    await idx.add(d, later())
    assert await idx.dense_entered("t1", near_e0) == {b.entry_key, d.entry_key}


async def check_replace(idx: DepsIndex) -> None:
    old = rec("a", cands=("c1", "c2"), terms=("alpha",), vec=E0, dc=0.9)
    await idx.add(old, later())
    new = rec("a", cands=("c3",), ctx=("c3",), terms=("beta",), vec=E1, dc=0.9)
    assert new.entry_key == old.entry_key
    await idx.add(new, later())
    k = new.entry_key
    assert await idx.by_chunks("t1", ["c1", "c2"]) == set()
    assert await idx.by_chunks("t1", ["c3"]) == {k}
    assert await idx.by_terms("t1", ["alpha"]) == set()
    assert await idx.by_terms("t1", ["beta"]) == {k}
    (got,) = await idx.records("t1", [k])
    assert got.candidate_ids == ("c3",)
    assert await idx.count() == 1
    assert await idx.dense_entered("t1", E0[None, :]) == set()
    assert await idx.dense_entered("t1", E1[None, :]) == {k}


async def check_remove(idx: DepsIndex) -> None:
    r1, r2 = rec("a", cands=("c1",), terms=("x",)), rec("b", cands=("c1",), terms=("x",), vec=E1, dc=None)
    plain = rec("p", cands=("c1",), terms=("x",), entry_key="not-a-ragline-key")
    for r in (r1, r2, plain):
        await idx.add(r, later())
    await idx.remove([r1.entry_key, plain.entry_key, key("never-added")])
    await idx.remove([])
    assert await idx.by_chunks("t1", ["c1"]) == {r2.entry_key}
    assert await idx.by_terms("t1", ["x"]) == {r2.entry_key}
    assert keys_of(await idx.records("t1", [r1.entry_key, r2.entry_key, plain.entry_key])) == {r2.entry_key}
    assert await idx.dense_entered("t1", E0[None, :]) == {r2.entry_key}
    assert set(await idx.tenant_keys("t1")) == {r2.entry_key}
    assert await idx.count() == 1
    await idx.remove([r2.entry_key])
    assert await idx.by_chunks("t1", ["c1"]) == set()
    assert await idx.dense_entered("t1", E0[None, :]) == set()
    assert await idx.count() == 0


async def check_clear(idx: DepsIndex) -> None:
    a1, b1 = rec("a", vec=E0, dc=None), rec("b", vec=E1, dc=None)
    a2 = rec("a", tenant="t2", vec=E0, dc=None)
    for r in (a1, b1, a2):
        await idx.add(r, later())
    assert await idx.dense_entered("t1", E0[None, :]) == {a1.entry_key, b1.entry_key}  # warm the matrix
    await idx.clear("t1")
    assert await idx.by_chunks("t1", ["c1"]) == set() and await idx.by_terms("t1", ["eiffel"]) == set()
    assert await idx.records("t1", [a1.entry_key]) == [] and await idx.tenant_keys("t1") == []
    assert await idx.dense_entered("t1", E0[None, :]) == set()
    assert await idx.by_chunks("t2", ["c1"]) == {a2.entry_key}
    assert await idx.dense_entered("t2", E0[None, :]) == {a2.entry_key}
    assert await idx.all_keys() == [a2.entry_key] and await idx.count() == 1
    await idx.add(a1, later())  # a cleared tenant works again
    assert await idx.by_chunks("t1", ["c1"]) == {a1.entry_key}
    assert await idx.dense_entered("t1", E0[None, :]) == {a1.entry_key}
    await idx.clear()
    assert await idx.all_keys() == [] and await idx.count() == 0
    assert await idx.by_chunks("t2", ["c1"]) == set() and await idx.dense_entered("t2", E0[None, :]) == set()


async def check_healthy_fallback_interface(idx: DepsIndex) -> None:
    r = rec("a")
    assert await idx.add(r, later()) is True
    await idx.by_chunks("t1", ["c1"])
    await idx.dense_entered("t1", E0[None, :])
    await idx.records("t1", [r.entry_key])
    assert idx.lookup_failures == 0
    assert idx.has_local_only is False
    assert await idx.local_only(r.entry_key) is False
    assert await idx.take_local_only() == []


CONTRACT: list[Callable[[DepsIndex], Awaitable[None]]] = [
    check_add_and_lookups,
    check_dense_entered,
    check_replace,
    check_remove,
    check_clear,
    check_healthy_fallback_interface,
]


# ------------------------------------------------------------------ SQLite


@pytest.fixture
async def index(tmp_path: Path) -> AsyncIterator[DependencyIndex]:
    idx = DependencyIndex(tmp_path / "deps.sqlite3")
    yield idx
    await idx.close()


@pytest.mark.parametrize("check", CONTRACT, ids=lambda f: f.__name__)
async def test_sqlite_contract(check: Callable[[DepsIndex], Awaitable[None]], index: DependencyIndex) -> None:
    await check(index)


async def test_sqlite_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "deps.sqlite3"
    idx = DependencyIndex(path)
    r = rec("a", cands=("c7",), terms=("zeta",), vec=E2, dc=None)
    await idx.add(r, later())
    await idx.close()
    idx = DependencyIndex(path)
    try:
        assert await idx.by_chunks("t1", ["c7"]) == {r.entry_key}
        assert await idx.by_terms("t1", ["zeta"]) == {r.entry_key}
        assert await idx.dense_entered("t1", E0[None, :]) == {r.entry_key}
        assert await idx.has(r.entry_key) and not await idx.has(key("b"))
    finally:
        await idx.close()


async def test_dense_skips_records_of_another_dimension(index: DependencyIndex) -> None:
    await index.add(rec("small", vec=unit(1.0, 0.0), dc=None), later())  # another embedder's entry
    big = rec("big", vec=E0, dc=None)
    await index.add(big, later())
    assert await index.dense_entered("t1", E0[None, :]) == {big.entry_key}


def test_dense_rows_follow_adds_replacements_and_removes() -> None:
    from ragline.cache.deps import DenseRows

    dim = 4
    e = [np.eye(dim, dtype=np.float32)[i] for i in range(dim)]

    def r(key: str, v: np.ndarray, cutoff: float | None) -> DepRecord:
        return DepRecord(key, "t", "q", v, (), (), (), cutoff, None, 1, False)

    rows = DenseRows([r("a", e[0], 0.9)], dim)
    for i in range(40):  # grows past its initial capacity
        rows.upsert(r(f"k{i}", e[1], 0.5))
    assert rows.entered(e[0][None, :]) == {"a"}
    rows.upsert(r("a", e[2], 0.9))  # a replaced record moves its row, never duplicates it
    assert rows.entered(e[0][None, :]) == set() and rows.entered(e[2][None, :]) == {"a"}
    rows.remove(["k0", "a", "missing"])
    assert rows.entered(e[2][None, :]) == set()
    assert rows.entered(e[1][None, :]) == {f"k{i}" for i in range(1, 40)}
    rows.upsert(r("open", e[3], None))  # a list that was not full: any new vector enters
    assert "open" in rows.entered(e[0][None, :])


async def test_dense_checks_see_records_another_process_wrote(tmp_path: Path) -> None:
    """Two indexes on one file stand in for two processes (workers, a CLI ingest): each one's dense
    check must find the other's entries, added or removed after its matrix was built."""
    a, b = DependencyIndex(tmp_path / "deps.sqlite3"), DependencyIndex(tmp_path / "deps.sqlite3")
    try:
        await a.add(rec("first", vec=E0, dc=0.5), later())
        assert await b.dense_entered("t1", E0[None, :]) == {rec("first").entry_key}  # b's matrix is built
        other = E1
        await a.add(rec("second", vec=other, dc=0.5), later())
        assert await b.dense_entered("t1", other[None, :]) == {rec("second").entry_key}
        await a.remove([rec("second").entry_key])
        assert await b.dense_entered("t1", other[None, :]) == set()
        await b.add(rec("third", vec=other, dc=0.5), later())
        assert await a.dense_entered("t1", other[None, :]) == {rec("third").entry_key}
        await a.clear("t1")
        assert await b.dense_entered("t1", E0[None, :]) == set()
    finally:
        await a.close()
        await b.close()
