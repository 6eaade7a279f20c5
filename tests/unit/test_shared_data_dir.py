"""Several pipelines on one data dir (as uvicorn workers, a CLI ingest and a second server are):
every one sees every committed change before its next read and serves nothing it invalidated
(DESIGN.md §3.7, §6).  Two AsyncRAG instances in one test process stand in for two processes:
each has its own SQLite connections, indexes, L1 and memory-mapped sequence file.

Fast: HashEmbedder + ScriptedLLM, no services.  tests/integration/test_serve_workers.py runs the
same with real worker processes and a CLI ingest.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from ragline.config import Settings
from ragline.ingest.chunking import doc_hash
from ragline.pipeline import AsyncRAG
from ragline.store.changelog import ChangeLog
from ragline.store.embedded import EmbeddedStore
from ragline.store.writes import upsert_rows
from ragline.testing import HashEmbedder, ScriptedLLM
from ragline.types import Chunk, Document

DOCS = [
    Document("paris", "Paris is the capital of France. The Eiffel Tower opened in 1889.", "Paris"),
    Document("cats", "Domestic cats sleep for sixteen hours a day and purr when content.", "Cats"),
    Document("tea", "Green tea contains caffeine and antioxidants called catechins.", "Tea"),
]
Q = "When did the Eiffel Tower open?"


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def make(**cache: Any) -> Settings:
        return Settings(
            data_dir=tmp_path / "data",
            cache={"enabled": True, "redis_url": None, "semantic": False, **cache},
            retrieval={"k": 2, "candidates": 4},
            context={"max_sources": 2},
        )

    return make


@pytest.fixture
async def pair(make_settings: Callable[..., Settings]) -> AsyncIterator[tuple[AsyncRAG, AsyncRAG]]:
    a = await AsyncRAG(make_settings(), embedder=HashEmbedder(), llm=ScriptedLLM()).start()
    b = await AsyncRAG(make_settings(), embedder=HashEmbedder(), llm=ScriptedLLM()).start()
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


def _ids(hits: list[Any]) -> list[str]:
    return [h.doc_id for h in hits]


async def test_a_write_through_one_is_searched_by_the_other(pair: tuple[AsyncRAG, AsyncRAG]) -> None:
    a, b = pair
    assert await b.search("Eiffel Tower", cache_mode="bypass") == []
    await a.ingest(DOCS)
    for mode in ("bypass", "default"):
        assert _ids(await b.search("Eiffel Tower", cache_mode=mode))[0] == "paris"
    await a.delete(["paris"])
    assert "paris" not in _ids(await b.search("Eiffel Tower", cache_mode="bypass"))
    assert "paris" not in _ids(await b.search("Eiffel Tower"))  # the cached result went with the change
    await b.ingest([Document("paris", "The Eiffel Tower opened to the public in 1889.", "Paris")])
    assert _ids(await a.search("Eiffel Tower"))[0] == "paris"


async def test_an_answer_cached_by_one_is_not_served_stale_after_a_change_by_the_other(
    pair: tuple[AsyncRAG, AsyncRAG],
) -> None:
    a, b = pair
    await a.ingest(DOCS)
    first = await b.ask(Q)
    assert first.cache.kind == "miss" and (await b.ask(Q)).cache.kind == "exact"
    assert (await a.ask(Q)).cache.kind == "exact"  # b's answer, from the shared L3
    await a.ingest([Document("paris", "The Eiffel Tower was completed and opened in March 1889.", "Paris")])
    for rag in (b, a):
        fresh = await rag.ask(Q, cache_mode="bypass")
        served = await rag.ask(Q)
        assert {(s.chunk_id, s.text) for s in served.sources} == {(s.chunk_id, s.text) for s in fresh.sources}
        assert any("March" in s.text for s in served.sources)


async def test_a_keyword_change_by_one_reaches_the_others_clock(pair: tuple[AsyncRAG, AsyncRAG]) -> None:
    a, b = pair
    await a.ingest(DOCS)
    await b.ask(Q)
    cache = b.cache
    assert cache is not None and cache.clock is not None
    key = cache.answer_key("default", Q, 2, ())
    assert cache.get_l1(key, "default") is not None
    await a.ingest([Document("cranes", "Tower cranes lift steel beams.", "Cranes")])  # shares "tower"
    await b.catch_up()
    assert cache.get_l1(key, "default") is None  # held back: its terms changed after its stamp
    assert b._follower is not None and b._follower.applied >= 1


async def test_results_computed_across_anothers_change_are_not_cached(pair: tuple[AsyncRAG, AsyncRAG]) -> None:
    a, b = pair
    await a.ingest(DOCS)
    inv = b._invalidation
    assert inv is not None
    gen = inv.generation("default")
    await a.ingest([Document("owls", "Owls hunt at night.", "Owls")])  # published while b "computes"
    assert not inv._unchanged("default", gen)


def _doc(doc_id: str, text: str, emb: HashEmbedder) -> tuple[Document, str, list[Chunk], Any]:
    doc = Document(doc_id, text, doc_id.title())
    ch = Chunk(f"{doc_id}#0", doc_id, 0, text, doc.title, doc_hash(doc), {})
    return doc, doc_hash(doc), [ch], emb.embed([ch.index_text])


async def test_a_dead_writers_change_is_repaired_by_the_next_writer(tmp_path: Path) -> None:
    emb = HashEmbedder()
    s1, s2 = EmbeddedStore(tmp_path, emb.dim), EmbeddedStore(tmp_path, emb.dim)
    try:
        s2.upsert("default", [_doc("bees", "Honey bees dance to tell the hive where flowers bloom.", emb)])
        with s1._db_lock:  # rows and a pending change, then the writer "dies" before tantivy and publish
            upsert_rows(s1._db, "default", [_doc("owls", "Owls hunt at night and swallow their prey.", emb)], s1._log)
        assert s2.sync() == [] and len(ChangeLog.pending(s2._db, "default")) == 1  # its own write: not reported
        assert s2.search_keyword("default", "owls prey", 5) == []  # not published: not applied
        s2.upsert("default", [_doc("tea", "Green tea contains caffeine.", emb)])  # the next writer repairs
        assert ChangeLog.pending(s2._db, "default") == []
        assert [h.chunk_id for h in s2.search_keyword("default", "owls prey", 5)] == ["owls#0"]
        assert [c.tenant for c in s2.sync()] == ["default"]  # reported once, for the caches
        s1.sync()
        assert [h.chunk_id for h in s1.search_keyword("default", "owls prey", 5)] == ["owls#0"]
        assert [h.chunk_id for h in s1.search_dense("default", emb.embed(["Owls\nOwls hunt"])[0], 1)] == ["owls#0"]
    finally:
        s1.close()
        s2.close()


def test_every_publish_moves_the_shared_counter(tmp_path: Path) -> None:
    """Two handles on one sequence file (as two processes have), bumping at once: no bump is lost, so a
    reader that synced between two publishes always sees the counter move again."""
    import threading

    from ragline.store.changelog import SeqFile

    a, b = SeqFile(tmp_path / "changes.seq"), SeqFile(tmp_path / "changes.seq")
    try:
        threads = [threading.Thread(target=lambda s=s: [s.bump() for _ in range(500)]) for s in (a, b, a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert a.read() == b.read() == 2000
    finally:
        a.close()
        b.close()


def test_changes_a_write_applied_are_still_reported(tmp_path: Path) -> None:
    """A write first applies what other processes published (its index operations must follow theirs);
    until the caller syncs, the store says it is behind, so those changes still reach the caches."""
    emb = HashEmbedder()
    s1, s2 = EmbeddedStore(tmp_path, emb.dim), EmbeddedStore(tmp_path, emb.dim)
    try:
        theirs = s2.upsert("default", [_doc("owls", "Owls hunt at night.", emb)])
        s1.upsert("default", [_doc("bees", "Bees dance.", emb)])  # applies s2's change on its way
        assert s1.synced_version() != s1.version()
        assert [c.seq for c in s1.sync()] == [theirs.seq] and s1.synced_version() == s1.version()
    finally:
        s1.close()
        s2.close()


def test_a_restarted_process_knows_what_recent_changes_removed(tmp_path: Path) -> None:
    from ragline.assembly import term_clock
    from ragline.cache.clock import GONE

    emb = HashEmbedder()
    s = EmbeddedStore(tmp_path, emb.dim)
    try:
        s.upsert("default", [_doc("owls", "Owls hunt at night.", emb)])
        gone = s.delete("default", ["owls"])
        clock = term_clock(s)  # what a process starting now knows
        v = emb.embed(["x"])[0]
        assert clock.affected("default", gone.seq - 1, (), (), ("owls#0",), v, 0.99) == GONE
    finally:
        s.close()
