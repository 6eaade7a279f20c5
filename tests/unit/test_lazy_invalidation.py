"""Lazy invalidation (the default): a change marks, the next read re-verifies (DESIGN.md §3.1).

Fast: AsyncRAG with HashEmbedder + ScriptedLLM, L1 + L3, no services. The tier-level mark and
compare-and-set semantics are tested on the memory and disk tiers here, on Redis in
tests/integration/test_cache_redis.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ragline.cache.disk import DiskTier
from ragline.cache.marks import is_marked, mark, new_token, unmarked
from ragline.cache.memory import MemoryTier
from ragline.config import Settings
from ragline.pipeline import AsyncRAG
from ragline.testing import HashEmbedder, ScriptedLLM
from ragline.types import Document

DOCS = [
    Document("paris", "Paris is the capital of France. The Eiffel Tower opened in 1889.", "Paris"),
    Document("cats", "Domestic cats sleep for sixteen hours a day and purr when content.", "Cats"),
    Document("tea", "Green tea contains caffeine and antioxidants called catechins.", "Tea"),
]
Q = "When did the Eiffel Tower open?"


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def make(k: int = 2, **cache: Any) -> Settings:
        return Settings(
            data_dir=tmp_path / "data",
            cache={"enabled": True, "redis_url": None, "semantic": False, **cache},
            retrieval={"k": k, "candidates": 3},
            context={"max_sources": k},
        )

    return make


def test_marks_are_a_header_that_round_trips() -> None:
    t1, t2 = new_token(), new_token()
    v = b'{"answer": "x"}'
    assert not is_marked(v) and unmarked(v) == v
    m1 = mark(v, t1)
    assert is_marked(m1) and unmarked(m1) == v
    m2 = mark(m1, t2)  # re-marking replaces the token, never stacks headers
    assert m2 != m1 and unmarked(m2) == v and len(m2) == len(m1)


async def test_memory_and_disk_tiers_mark_in_place_and_compare_and_set(tmp_path: Path) -> None:
    for tier in (MemoryTier(1 << 20), DiskTier(tmp_path / "l3", max_bytes=1 << 24)):
        await tier.set_many({"a": b"{1}", "b": b"{2}"}, 60.0)
        t1, t2 = new_token(), new_token()
        await tier.mark_many(["a", "missing"], t1)
        got = await tier.get_many_ttl(["a", "b", "missing"])
        assert set(got) == {"a", "b"} and got["a"][0] == mark(b"{1}", t1) and got["b"][0] == b"{2}"
        assert got["a"][1] is not None and 55 < got["a"][1] <= 60  # the TTL is kept
        await tier.mark_many(["a"], t2)  # a newer change
        assert not await tier.replace("a", mark(b"{1}", t1), b"{1}")  # a stale verification cannot clear it
        assert await tier.replace("a", mark(b"{1}", t2), b"{1}")
        assert (await tier.get_many(["a"]))["a"] == b"{1}"
        await tier.close()


async def test_a_change_costs_no_retrieval_and_a_read_reverifies(
    make_settings: Callable[..., Settings],
) -> None:
    llm = ScriptedLLM()
    # one source: the new document ranks below Paris, so the answer's evidence is unchanged
    async with AsyncRAG(make_settings(k=1), embedder=HashEmbedder(), llm=llm) as rag:
        await rag.ingest(DOCS)
        assert (await rag.ask(Q)).cache.kind == "miss"
        cache = rag.cache
        assert cache is not None
        calls = llm.calls
        # a document sharing the query's terms but not its evidence: recorded by the clock, nothing
        # looked up, marked or re-run yet (ragline.cache.clock)
        await rag.ingest([Document("shop", "Opening hours of the museum shop are posted at its door.")])
        assert cache.counter("clock_recorded") >= 1 and cache.counter("invalidation_marked") == 0
        assert cache.counter("reverify_on_read") == 0 and cache.counter("invalidation_checked") == 0
        key = cache.answer_key("default", Q, 1, ())
        assert cache.get_l1(key, "default") is None  # the hot path never hands out an unverified value
        body, info = await rag.ask_body(Q)
        assert info.kind == "exact" and not is_marked(body)
        assert cache.counter("reverify_kept") == 1 and llm.calls == calls
        assert (await rag.ask(Q)).cache.kind == "exact" and cache.counter("reverify_on_read") == 1  # cleared


async def test_an_entry_whose_evidence_changed_is_recomputed(make_settings: Callable[..., Settings]) -> None:
    llm = ScriptedLLM()
    async with AsyncRAG(make_settings(), embedder=HashEmbedder(), llm=llm) as rag:
        await rag.ingest(DOCS)
        first = await rag.ask(Q)
        cache = rag.cache
        assert cache is not None
        calls = llm.calls
        better = Document("eiffel", "When did the Eiffel Tower open? The Eiffel Tower opened in 1889 in Paris.")
        await rag.ingest([better])
        assert cache.counter("clock_recorded") >= 1
        again = await rag.ask(Q)
        assert again.cache.kind == "miss" and llm.calls == calls + 1
        assert "eiffel" in {s.doc_id for s in again.sources} and again.sources != first.sources
        assert cache.counter("reverify_dropped") >= 1  # the answer (and its retrieval entry)
        fresh = await rag.ask(Q, cache_mode="bypass")
        assert {s.chunk_id for s in (await rag.ask(Q)).sources} == {s.chunk_id for s in fresh.sources}


async def test_marked_retrieval_entries_are_reverified(make_settings: Callable[..., Settings]) -> None:
    async with AsyncRAG(make_settings(), embedder=HashEmbedder(), llm=ScriptedLLM()) as rag:
        await rag.ingest(DOCS)
        await rag.search("green tea caffeine", k=2)
        assert rag.cache is not None
        await rag.ingest([Document("coffee", "Coffee has more caffeine than green tea.")])
        again = await rag.search("green tea caffeine", k=2)
        fresh = await rag.search("green tea caffeine", k=2, cache_mode="bypass")
        assert [h.chunk_id for h in again] == [h.chunk_id for h in fresh]
        assert rag.cache.counter("reverify_on_read") >= 1  # the cached ranking was re-verified, not reused


async def test_marks_survive_a_restart(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    async with AsyncRAG(settings, embedder=HashEmbedder(), llm=ScriptedLLM()) as rag:
        await rag.ingest(DOCS)
        await rag.ask(Q)
        await rag.ingest([Document("eiffel", "When did the Eiffel Tower open? The Eiffel Tower opened in 1889.")])
    llm = ScriptedLLM()
    async with AsyncRAG(settings, embedder=HashEmbedder(), llm=llm) as rag:  # L1 is empty: L3 holds the mark
        again = await rag.ask(Q)
        assert rag.cache is not None and rag.cache.counter("reverify_dropped") >= 1
        assert again.cache.kind == "miss" and "eiffel" in {s.doc_id for s in again.sources}


@pytest.mark.parametrize("mode", ["eager", "flush", "flush_all"])
async def test_the_other_modes_never_serve_stale_answers(make_settings: Callable[..., Settings], mode: str) -> None:
    llm = ScriptedLLM()
    async with AsyncRAG(make_settings(invalidation=mode), embedder=HashEmbedder(), llm=llm) as rag:
        await rag.ingest(DOCS)
        await rag.ask(Q)
        await rag.ingest([Document("eiffel", "When did the Eiffel Tower open? The Eiffel Tower opened in 1889.")])
        again = await rag.ask(Q)
        assert again.cache.kind == "miss" and "eiffel" in {s.doc_id for s in again.sources}
        assert rag.cache is not None and rag.cache.counter("invalidation_marked") == 0


def test_precise_is_still_accepted_as_eager() -> None:
    assert Settings(cache={"invalidation": "precise"}).cache.invalidation == "eager"
    assert Settings().cache.invalidation == "lazy"


async def test_a_failed_reverification_runs_retrieval_once(make_settings: Callable[..., Settings]) -> None:
    from ragline.store.embedded import EmbeddedStore

    settings = make_settings()
    emb = HashEmbedder()

    class Counting:  # the real store, counting dense searches (one per hybrid retrieval)
        def __init__(self) -> None:
            self.inner = EmbeddedStore(settings.data_dir, emb.dim)
            self.dense = 0

        def search_dense(self, *a: Any) -> Any:
            self.dense += 1
            return self.inner.search_dense(*a)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    store = Counting()
    async with AsyncRAG(settings, embedder=emb, llm=ScriptedLLM(), store=store) as rag:  # type: ignore[arg-type]
        await rag.ingest(DOCS)
        await rag.ask(Q)
        await rag.ingest([Document("eiffel", "When did the Eiffel Tower open? The Eiffel Tower opened in 1889.")])
        before = store.dense
        again = await rag.ask(Q)  # the answer is marked, its re-verification fails, then the miss path
        assert again.cache.kind == "miss" and rag.cache is not None
        assert rag.cache.counter("reverify_dropped") == 1  # ask stores no retrieval entry beside its answer
        assert store.dense - before == 1


async def test_disk_marks_follow_writes_deletes_and_clears(tmp_path: Path) -> None:
    l3 = DiskTier(tmp_path / "l3", max_bytes=1 << 24)
    t = new_token()
    await l3.set_many({"rl:v1:a:answer:1": b"{1}", "rl:v1:b:answer:2": b"{2}"}, 60.0)
    await l3.mark_many(["rl:v1:a:answer:1", "rl:v1:b:answer:2", "rl:v1:a:answer:absent"], t)
    assert await l3.get_many(["rl:v1:a:answer:absent"]) == {}  # a mark never makes a value
    await l3.set_many({"rl:v1:a:answer:1": b"{fresh}"}, 60.0)  # a fresh value carries no old mark
    assert await l3.get_many(["rl:v1:a:answer:1"]) == {"rl:v1:a:answer:1": b"{fresh}"}
    await l3.clear("rl:v1:b:")
    await l3.set_many({"rl:v1:b:answer:2": b"{2}"}, 60.0)
    assert await l3.get_many(["rl:v1:b:answer:2"]) == {"rl:v1:b:answer:2": b"{2}"}
    await l3.mark_many(["rl:v1:b:answer:2"], t)
    await l3.delete_many(["rl:v1:b:answer:2"])
    await l3.set_many({"rl:v1:b:answer:2": b"{2}"}, 60.0)
    assert not is_marked((await l3.get_many(["rl:v1:b:answer:2"]))["rl:v1:b:answer:2"])
    await l3.close()
