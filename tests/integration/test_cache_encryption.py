"""Encryption at rest of L2 (a real redis-server) and L3 (a real disk tier), end to end (issue 10, evidence 6).

* With ``cache.encryption_key`` nothing in Redis (every key's value, of every type, and the key names)
  or under the L3 directory (raw bytes of every file, SQLite databases and WALs included) contains
  the answer's sentence, the source document's sentence or the question; without a key the same run
  finds them (the scan works).
* Exact hits are still served from L2 and from L3 with encryption on.
* Rotation: what key A wrote is read with ``encryption_key=B, encryption_previous_keys=[A]``; with B
  alone it is a counted miss, recomputed and sealed with B.
* The Redis tier's in-place marks (Lua) and compare-and-set keep working on sealed values, also across
  a rotation; the Redis dependency index passes its contract with encryption on (hashed term names).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from ragline.cache.crypto import ValueCipher
from ragline.cache.deps import DepsIndex
from ragline.cache.deps_redis import RedisDependencyIndex
from ragline.cache.marks import mark, new_token, stamped, unmarked
from ragline.cache.redis import RedisTier
from ragline.config import Settings
from ragline.pipeline import AsyncRAG
from ragline.testing import HashEmbedder, ScriptedLLM
from ragline.types import Document
from tests.unit.test_deps import CONTRACT, later, rec

pytestmark = pytest.mark.slow

SOURCE = "The violet zeppelin hovered above Reykjavik harbour for eleven days in 1931."
ANSWER = "Quartz owls have guarded the lighthouse of Brindisi every winter since the flood."
QUESTION = "How long did the violet zeppelin hover above the harbour?"
DOCS = [
    Document("zeppelin", SOURCE + " It carried a brass orchestra and forty pigeons.", title="Zeppelin"),
    Document("cats", "Domestic cats sleep for up to sixteen hours a day.", title="Cats"),
    Document("tea", "Green tea contains caffeine and antioxidants called catechins.", title="Tea"),
]
SECRETS = (SOURCE, ANSWER, QUESTION.rstrip("?"))  # the cache holds the query form (no trailing "?")


def new_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def settings(data_dir: Path, redis_url: str, key: str | None = None, previous: tuple[str, ...] = ()) -> Settings:
    cache: dict[str, Any] = {"enabled": True, "redis_url": redis_url}
    if key is not None:
        cache |= {"encryption_key": key, "encryption_previous_keys": list(previous)}
    return Settings(data_dir=data_dir, cache=cache)


def llm() -> ScriptedLLM:
    return ScriptedLLM({"zeppelin": ANSWER + " [1]"})


def redis_dump(url: str) -> bytes:
    """Every key name and every value of every type in the Redis database."""
    r = redis.Redis.from_url(url)
    out: list[bytes] = []
    try:
        for k in r.scan_iter(count=1000):
            out.append(k)
            t = r.type(k).decode()
            if t == "string":
                out.append(r.get(k) or b"")
            elif t == "set":
                out.extend(r.smembers(k))
            elif t == "hash":
                for f, v in r.hgetall(k).items():
                    out += [f, v]
            elif t == "list":
                out.extend(r.lrange(k, 0, -1))
            elif t == "zset":
                out.extend(m for m, _ in r.zrange(k, 0, -1, withscores=True))
            elif t == "stream":
                out.extend(b"".join(f + v for f, v in fields.items()) for _, fields in r.xrange(k))
            else:
                out.append(r.dump(k) or b"")
    finally:
        r.close()
    return b"\n".join(out)


def disk_dump(root: Path) -> bytes:
    """The raw bytes of every file under ``root`` (diskcache's SQLite and value files, marks, deps)."""
    return b"\n".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def found(blob: bytes) -> set[str]:
    return {s for s in SECRETS if s.encode() in blob}


async def ask_from(rag: AsyncRAG, tier: str, redis_url: str) -> tuple[str, str | None]:
    """Ask QUESTION so that the answer can only come from ``tier``: L1 emptied, and for L3 the
    answer entries deleted from Redis too."""
    assert rag.cache is not None and rag.cache.tiers.l1 is not None
    rag.cache.tiers.l1.clear_prefix()
    if tier == "l3":
        r = redis.Redis.from_url(redis_url)
        for k in r.scan_iter(match="rl:v1:*:answer:*"):
            r.delete(k)
        r.close()
    a = await rag.ask(QUESTION)
    return a.cache.kind, a.cache.tier


@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "plaintext"])
async def test_l2_and_l3_hold_no_plaintext_with_a_key(tmp_path: Path, redis_url: str, encrypted: bool) -> None:
    s = settings(tmp_path / "data", redis_url, new_key() if encrypted else None)
    async with AsyncRAG(s, embedder=HashEmbedder(), llm=llm()) as rag:
        await rag.ingest(DOCS)
        first = await rag.ask(QUESTION)
        assert first.cache.kind == "miss" and ANSWER in first.text
        assert any(SOURCE in h.text for h in first.sources)
        await rag.search(QUESTION)  # a cached retrieval result too
        assert rag.cache is not None
        await rag.cache.behind.drain()  # (written behind the response)
        for tier in ("l2", "l3"):  # exact hits from each slower tier, encrypted or not
            assert await ask_from(rag, tier, redis_url) == ("exact", tier)
        in_redis, on_disk = redis_dump(redis_url), disk_dump(s.data_dir / "cache")
        assert rag.cache is not None
        assert [rag.cache.tiers.tier(t).stats()["undecryptable"] for t in ("l2", "l3")] == [0, 0]  # type: ignore[union-attr]
    on_disk_closed = disk_dump(s.data_dir / "cache")
    if encrypted:
        assert found(in_redis) == set() and found(on_disk) == set() and found(on_disk_closed) == set()
    else:  # the same scans find them when nothing is sealed: the test can see plaintext
        assert found(in_redis) == set(SECRETS)
        assert {SOURCE, ANSWER} <= found(on_disk) | found(on_disk_closed)


async def test_rotation_reads_the_previous_key_and_drops_retired_ones(tmp_path: Path, redis_url: str) -> None:
    a, b = new_key(), new_key()
    data = tmp_path / "data"
    model = llm()
    async with AsyncRAG(settings(data, redis_url, a), embedder=HashEmbedder(), llm=model) as rag:
        await rag.ingest(DOCS)
        assert (await rag.ask(QUESTION)).cache.kind == "miss"
    calls = model.calls
    async with AsyncRAG(settings(data, redis_url, b, (a,)), embedder=HashEmbedder(), llm=model) as rag:
        assert (await rag.ask(QUESTION)).cache.tier == "l2"  # a new process: L1 is empty
        assert await ask_from(rag, "l3", redis_url) == ("exact", "l3")  # promoted back to L2, sealed with B
    assert model.calls == calls
    async with AsyncRAG(settings(data, redis_url, b), embedder=HashEmbedder(), llm=model) as rag:
        # the answer was promoted to L2 under B during the rotation: still served
        assert (await rag.ask(QUESTION)).cache.kind == "exact"
        assert rag.cache is not None
        # everything A sealed is a counted miss: drop B's copy and L3 still holds A's only
        r = redis.Redis.from_url(redis_url)
        for k in r.scan_iter(match="rl:v1:*:answer:*"):
            r.delete(k)
        r.close()
        rag.cache.tiers.l1.clear_prefix()  # type: ignore[union-attr]
        again = await rag.ask(QUESTION)
        assert again.cache.kind == "miss" and ANSWER in again.text and model.calls == calls + 1
        assert rag.cache.tiers.tier("l3").stats()["undecryptable"] >= 1  # type: ignore[union-attr]
        assert await ask_from(rag, "l2", redis_url) == ("exact", "l2")  # recomputed, sealed with B
        assert await ask_from(rag, "l3", redis_url) == ("exact", "l3")


async def test_an_update_still_invalidates_with_encryption(tmp_path: Path, redis_url: str) -> None:
    async with AsyncRAG(settings(tmp_path / "data", redis_url, new_key()), embedder=HashEmbedder(), llm=llm()) as rag:
        await rag.ingest(DOCS)
        await rag.ask(QUESTION)
        assert await ask_from(rag, "l2", redis_url) == ("exact", "l2")
        changed = "The violet zeppelin hovered above Reykjavik harbour for twelve days in 1932."
        await rag.ingest([Document("zeppelin", changed, title="Zeppelin")])
        fresh = await rag.ask(QUESTION)
        assert fresh.cache.kind == "miss" and any(changed in h.text for h in fresh.sources)
        assert found(redis_dump(redis_url)) == set()


# ------------------------------------------------------------------ the Redis tier and index on their own


async def test_redis_tier_marks_and_compare_and_set_on_sealed_values(redis_url: str) -> None:
    a_raw, b_raw = os.urandom(32), os.urandom(32)
    key = "rl:v1:t1:answer:" + "0" * 32
    body = stamped(b'{"answer":"' + ANSWER.encode() + b'"}', 3)
    old = RedisTier(redis_url, cipher=ValueCipher([a_raw]), timeout_s=1.0)
    try:
        await old.set_many({key: body}, 60)
        assert await old.get_many([key]) == {key: body}
    finally:
        await old.close()
    b = ValueCipher([b_raw, a_raw])  # rotated: A is a previous key
    tier = RedisTier(redis_url, cipher=b, timeout_s=1.0)
    try:
        token = new_token()
        await tier.mark_many([key], token)  # the Lua script prepends a mark to the sealed bytes
        marked = (await tier.get_many([key]))[key]
        assert marked == mark(body, token)
        assert await tier.replace(key, marked, stamped(unmarked(marked), 4))  # stored under A: a candidate
        assert await tier.get_many([key]) == {key: stamped(unmarked(body), 4)}
        assert not await tier.replace(key, marked, body)  # no longer marked: refused
        assert ANSWER.encode() not in redis_dump(redis_url)
    finally:
        await tier.close()
    plain = RedisTier(redis_url, timeout_s=1.0)  # encryption turned off: sealed values are counted misses
    try:
        assert await plain.get_many([key]) == {} and plain.stats()["undecryptable"] == 1
    finally:
        await plain.close()


@pytest.mark.parametrize("check", CONTRACT, ids=lambda f: f.__name__)
async def test_redis_index_contract_with_encryption(
    check: Callable[[DepsIndex], Awaitable[None]], redis_url: str, tmp_path: Path
) -> None:
    idx = RedisDependencyIndex(redis_url, tmp_path / "deps.sqlite3", reset_s=0.1, cipher=ValueCipher([os.urandom(32)]))
    try:
        await check(idx)
        assert await idx.local.count() == 0
    finally:
        await idx.close()


async def test_redis_index_holds_no_query_text_and_finds_previous_keys_terms(redis_url: str, tmp_path: Path) -> None:
    a, b = os.urandom(32), os.urandom(32)
    r = rec("secretive", terms=("zanzibar",))
    idx = RedisDependencyIndex(redis_url, tmp_path / "a.sqlite3", cipher=ValueCipher([a]))
    try:
        assert await idx.add(r, later())
    finally:
        await idx.close()
    dump = redis_dump(redis_url)
    assert b"zanzibar" not in dump and b"query secretive" not in dump
    rotating = RedisDependencyIndex(redis_url, tmp_path / "b.sqlite3", cipher=ValueCipher([b, a]))
    try:
        assert await rotating.by_terms("t1", ["zanzibar"]) == {r.entry_key}
        assert [x.query for x in await rotating.records("t1", [r.entry_key])] == ["query secretive"]
        await rotating.remove([r.entry_key])  # removal finds the sets named under the previous key
        assert await rotating.by_terms("t1", ["zanzibar"]) == set()
        client = redis.Redis.from_url(redis_url)
        assert not list(client.scan_iter(match="rl:v1:t1:dep:term:*"))
        client.close()
    finally:
        await rotating.close()
