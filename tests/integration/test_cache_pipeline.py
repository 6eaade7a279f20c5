"""The cache contracts end to end (DESIGN.md §3): exact and semantic hits, tenants,
single-flight, invalidation driven by ingestion, streaming, bypass/refresh, embeddings."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from ragline.config import Settings
from ragline.embed.local import LocalEmbedder
from ragline.errors import UpstreamError
from ragline.pipeline import AsyncRAG
from ragline.testing import FakeUpstream
from ragline.types import Document

DOCS = [
    Document("paris", "Paris is the capital of France. The Eiffel Tower was completed in 1889.", title="Paris"),
    Document("cats", "Domestic cats sleep for up to sixteen hours a day.", title="Cats"),
    Document("rome", "Rome is the capital of Italy. The Colosseum was completed in 80 AD.", title="Rome"),
    Document("tea", "Green tea contains caffeine and antioxidants called catechins.", title="Tea"),
    Document("moon", "The Moon orbits the Earth every 27.3 days.", title="Moon"),
    Document("bees", "Honey bees communicate the location of flowers with a waggle dance.", title="Bees"),
]
Q = "When was the Eiffel Tower completed?"


def cached(make_settings: Callable[..., Settings], **extra: Any) -> Settings:
    cache = {"enabled": True, **extra.pop("cache", {})}
    return make_settings(cache=cache, **extra)


async def test_exact_hit_from_l1_then_l3_after_restart(
    make_settings: Callable[..., Settings], embedder: LocalEmbedder
) -> None:
    settings = cached(make_settings)
    async with AsyncRAG(settings, embedder=embedder) as rag:
        await rag.ingest(DOCS)
        first = await rag.ask(Q)
        assert first.cache.kind == "miss" and "1889" in first.text
        again = await rag.ask(Q)
        assert (again.cache.kind, again.cache.tier) == ("exact", "l1")
        assert again.text == first.text and again.sources == first.sources
    async with AsyncRAG(settings, embedder=embedder) as rag:
        after = await rag.ask(Q)
        assert (after.cache.kind, after.cache.tier) == ("exact", "l3")
        assert after.text == first.text


async def test_bypass_and_refresh(make_settings: Callable[..., Settings], embedder: LocalEmbedder) -> None:
    async with AsyncRAG(cached(make_settings), embedder=embedder) as rag:
        await rag.ingest(DOCS)
        assert (await rag.ask(Q, cache_mode="bypass")).cache.kind == "bypass"
        assert (await rag.ask(Q)).cache.kind == "miss"  # bypass stored nothing
        assert (await rag.ask(Q, cache_mode="refresh")).cache.kind == "miss"
        assert (await rag.ask(Q)).cache.kind == "exact"


async def test_a_semantic_hit_is_stored_behind_the_response_and_asked_again_is_exact(
    make_settings: Callable[..., Settings], embedder: LocalEmbedder
) -> None:
    """The semantic hit is written under the new query's key after the response went out (write-behind);
    the same question asked again at once still finds it, exactly, because a reader waits for it."""
    async with AsyncRAG(cached(make_settings), embedder=embedder) as rag:
        await rag.ingest(DOCS)
        await rag.ask(Q)
        para = await rag.ask("When exactly was the Eiffel Tower completed?")
        assert para.cache.kind == "semantic"
        again = await rag.ask("When exactly was the Eiffel Tower completed?")
        assert (again.cache.kind, again.cache.tier) == ("exact", "l1") and again.text == para.text
        assert rag.cache is not None and rag.cache.behind.written >= 1


async def test_semantic_hit_is_verified_and_guarded(
    make_settings: Callable[..., Settings], embedder: LocalEmbedder
) -> None:
    async with AsyncRAG(cached(make_settings), embedder=embedder) as rag:
        await rag.ingest(DOCS)
        await rag.ask(Q)
        variant = await rag.ask("when was the eiffel tower completed")  # the canonical form: an exact hit
        assert variant.cache.kind == "exact"
        para = await rag.ask("When exactly was the Eiffel Tower completed?")
        assert para.cache.kind == "semantic" and para.cache.matched_query == Q.rstrip("?")
        assert para.cache.similarity is not None and para.cache.similarity >= rag.settings.cache.semantic_min_cosine
        # numbers differ -> the guard refuses even though the vectors are close
        other = await rag.ask("Was the Eiffel Tower completed in 1890?")
        assert other.cache.kind == "miss"
        neg = await rag.ask("When was the Eiffel Tower not completed?")
        assert neg.cache.kind == "miss"


async def test_tenant_isolation_exact_semantic_and_retrieval(
    make_settings: Callable[..., Settings], embedder: LocalEmbedder
) -> None:
    async with AsyncRAG(cached(make_settings), embedder=embedder) as rag:
        await rag.ingest(DOCS, tenant="a")
        await rag.ingest([Document("b-doc", "The Eiffel Tower in tenant B's world was completed in 2001.")], tenant="b")
        a = await rag.ask(Q, tenant="a")
        b = await rag.ask(Q, tenant="b")
        assert b.cache.kind == "miss" and "1889" not in b.text
        assert {s.doc_id for s in b.sources} == {"b-doc"}
        b2 = await rag.ask("when was the eiffel tower completed", tenant="b")
        assert b2.cache.kind != "semantic" or b2.cache.matched_query != Q or "1889" not in b2.text
        assert all(s.doc_id == "b-doc" for s in b2.sources)
        assert {h.doc_id for h in await rag.search("Eiffel Tower", k=10, tenant="b")} == {"b-doc"}
        assert a.text != b.text


async def test_update_invalidates_only_dependents(
    make_settings: Callable[..., Settings], embedder: LocalEmbedder
) -> None:
    settings = cached(make_settings, retrieval={"k": 2, "candidates": 3}, context={"max_sources": 2})
    async with AsyncRAG(settings, embedder=embedder) as rag:
        await rag.ingest(DOCS)
        await rag.ask(Q)
        await rag.ask("How long do cats sleep?")
        # an unrelated new document: neither entry's context can change
        await rag.ingest([Document("jazz", "Jazz originated in New Orleans in the early twentieth century.")])
        assert (await rag.ask("How long do cats sleep?")).cache.kind == "exact"
        assert (await rag.ask(Q)).cache.kind == "exact"
        # updating Paris invalidates the Eiffel answer, not the cats answer
        await rag.ingest(
            [
                Document(
                    "paris",
                    "Paris is the capital of France. The Eiffel Tower was completed "
                    "in March 1889 for the World's Fair.",
                    title="Paris",
                )
            ]
        )
        fresh = await rag.ask(Q)
        assert fresh.cache.kind == "miss" and "World's Fair" in fresh.text
        assert (await rag.ask("How long do cats sleep?")).cache.kind == "exact"
        # deleting the cats document invalidates the cats answer
        await rag.delete(["cats"])
        gone = await rag.ask("How long do cats sleep?")
        assert gone.cache.kind == "miss" and all(s.doc_id != "cats" for s in gone.sources)
        # a new document that would be retrieved for a cached query invalidates it
        await rag.ask("How long do cats sleep?")
        await rag.ingest([Document("cats2", "Cats sleep about fifteen hours daily, more in winter.")])
        new = await rag.ask("How long do cats sleep?")
        assert new.cache.kind == "miss" and any(s.doc_id == "cats2" for s in new.sources)


async def test_editing_one_part_of_a_document_keeps_answers_grounded_elsewhere(
    make_settings: Callable[..., Settings], embedder: LocalEmbedder
) -> None:
    # small chunks: the tower sentence and the cheese sentence land in different chunks
    settings = cached(make_settings, chunk={"size": 24, "overlap": 0}, retrieval={"k": 1}, context={"max_sources": 1})
    head = "The Eiffel Tower in Paris was completed in 1889 for the World's Fair in France."
    tail = "Camembert is a soft cheese first made in Normandy in the late eighteenth century."
    async with AsyncRAG(settings, embedder=embedder) as rag:
        await rag.ingest([Document("guide", f"{head}\n\n{tail}", title="Guide"), *DOCS[1:]])
        assert len(rag.store.doc_state("default", ["guide"])["guide"].chunk_ids) >= 2
        first = await rag.ask(Q)
        assert first.cache.kind == "miss" and first.sources[0].chunk_id == "guide#0"
        # the end changes: the chunk the answer rests on is identical, so the answer stays
        await rag.ingest(
            [Document("guide", f"{head}\n\nBrie is a soft cheese from the Ile-de-France region.", title="Guide")]
        )
        assert (await rag.ask(Q)).cache.kind == "exact"
        # only the metadata changes: every chunk carries it into the answer's sources, so it goes
        await rag.ingest(
            [
                Document(
                    "guide",
                    f"{head}\n\nBrie is a soft cheese from the Ile-de-France region.",
                    title="Guide",
                    metadata={"v": 1},
                )
            ]
        )
        assert (await rag.ask(Q)).cache.kind == "miss"
        await rag.ingest(
            [
                Document(
                    "guide",
                    f"{head}\n\nBrie is a soft cheese from the Ile-de-France region.",
                    title="Guide",
                    metadata={"v": 1.0},
                )
            ]
        )  # JSON 1 != 1.0: a change
        assert (await rag.ask(Q)).sources[0].metadata == {"v": 1.0}
        # the start changes: that answer goes
        await rag.ingest([Document("guide", f"The Eiffel Tower was finished in 1889.\n\n{tail}", title="Guide")])
        again = await rag.ask(Q)
        assert again.cache.kind == "miss" and "finished" in again.sources[0].text


async def test_sampled_answers_are_cached_only_when_allowed(
    make_settings: Callable[..., Settings], embedder: LocalEmbedder
) -> None:
    async with AsyncRAG(cached(make_settings, llm={"temperature": 0.7}), embedder=embedder) as rag:
        await rag.ingest(DOCS)
        assert [(await rag.ask(Q)).cache.kind for _ in range(2)] == ["miss", "miss"]
        stream = await rag.ask_stream(Q)
        assert [e async for e, _ in stream][-1] == "done"
        assert (await rag.ask(Q, cache_mode="refresh")).cache.kind == "miss"
        assert (await rag.ask(Q)).cache.kind == "miss"
        assert (await rag.ask("when was the eiffel tower completed")).cache.kind == "miss"
        assert rag.cache is not None and rag.cache.stats()["semantic_entries"] == 0
    allowed = cached(make_settings, llm={"temperature": 0.7}, cache={"cache_nonzero_temperature": True})
    async with AsyncRAG(allowed, embedder=embedder) as rag:
        assert [(await rag.ask(Q)).cache.kind for _ in range(2)] == ["miss", "exact"]


@pytest.mark.parametrize("mode", ["lazy", "eager"])
async def test_a_change_sharing_a_query_term_is_rechecked(
    make_settings: Callable[..., Settings], embedder: LocalEmbedder, mode: str
) -> None:
    # one candidate per retriever: a far-off document that mentions "sleep" cannot enter the
    # context, but it moves the idf of "sleep" and so could reorder the keyword candidates
    settings = cached(
        make_settings, cache={"invalidation": mode}, retrieval={"k": 1, "candidates": 1}, context={"max_sources": 1}
    )
    # eager re-checks during the change; lazy advances the term clock, and the next read re-verifies
    async with AsyncRAG(settings, embedder=embedder) as rag:
        await rag.ingest(DOCS)
        q = "How long do cats sleep?"
        assert (await rag.ask(q)).cache.kind == "miss"
        cache = rag.cache
        assert cache is not None
        key = cache.answer_key("default", q, 1, ())
        for change in ("ingest", "delete"):  # a removed chunk's terms count too
            checked, kept = cache.counter("invalidation_checked"), cache.counter("reverify_kept")
            if change == "ingest":
                await rag.ingest([Document("ships", "Sailors on long voyages sleep in hammocks below deck.")])
            else:
                await rag.delete(["ships"])
            if mode == "eager":
                assert cache.counter("invalidation_checked") > checked  # re-checked during the change ...
            else:
                assert cache.get_l1(key, "default") is None  # ... or held back from the hot path
            assert (await rag.ask(q)).cache.kind == "exact"  # ... and kept
            assert cache.counter("reverify_kept") == kept + (mode == "lazy")


async def test_manual_invalidation(make_settings: Callable[..., Settings], embedder: LocalEmbedder) -> None:
    async with AsyncRAG(cached(make_settings), embedder=embedder) as rag:
        await rag.ingest(DOCS)
        await rag.ask(Q)
        assert await rag.invalidate(tenant="default", doc_id="paris") >= 1
        assert (await rag.ask(Q)).cache.kind == "miss"
        await rag.invalidate(everything=True)
        assert (await rag.ask(Q, cache_mode="default")).cache.kind == "miss"


async def test_single_flight_50_concurrent_identical_queries(
    make_settings: Callable[..., Settings], embedder: LocalEmbedder, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.configure(latency_ms=300, reply="It opened in 1889 [1].")
    settings = cached(make_settings, llm={"provider": "openai", "base_url": fake_upstream.url, "model": "m"})
    async with AsyncRAG(settings, embedder=embedder) as rag:
        await rag.ingest(DOCS)
        answers = await asyncio.gather(*(rag.ask(Q) for _ in range(50)))
    assert fake_upstream.route_calls("chat") == 1
    assert {a.text for a in answers} == {"It opened in 1889 [1]."}


async def test_single_flight_covers_streams(
    make_settings: Callable[..., Settings], embedder: LocalEmbedder, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.configure(latency_ms=300, reply="It opened in 1889 [1].")
    settings = cached(make_settings, llm={"provider": "openai", "base_url": fake_upstream.url, "model": "m"})
    async with AsyncRAG(settings, embedder=embedder) as rag:
        await rag.ingest(DOCS)

        async def stream_text() -> str:
            return "".join(d["text"] for e, d in [ev async for ev in await rag.ask_stream(Q)] if e == "delta")

        async def ask_text() -> str:
            return (await rag.ask(Q)).text

        # streams and non-streamed asks of one query, all at once: one generation
        texts = await asyncio.gather(*(stream_text() for _ in range(10)), *(ask_text() for _ in range(10)))
    assert fake_upstream.route_calls("chat") == 1
    assert set(texts) == {"It opened in 1889 [1]."}


async def test_cached_answer_streams_with_the_same_events(
    make_settings: Callable[..., Settings], embedder: LocalEmbedder
) -> None:
    async with AsyncRAG(cached(make_settings), embedder=embedder) as rag:
        await rag.ingest(DOCS)
        fresh = [e async for e in await rag.ask_stream(Q)]
        hit = [e async for e in await rag.ask_stream(Q)]
    assert fresh[0][0] == hit[0][0] == "sources"
    assert fresh[-1][0] == hit[-1][0] == "done"
    assert fresh[-1][1]["cache"]["kind"] == "miss" and hit[-1][1]["cache"]["kind"] == "exact"
    text = lambda ev: "".join(d["text"] for e, d in ev if e == "delta")  # noqa: E731
    assert text(fresh) == text(hit) and "1889" in text(hit)
    assert fresh[0][1] == hit[0][1]


async def test_failed_stream_is_not_cached(
    make_settings: Callable[..., Settings], embedder: LocalEmbedder, fake_upstream: FakeUpstream
) -> None:
    settings = cached(
        make_settings, llm={"provider": "openai", "base_url": fake_upstream.url, "model": "m", "retries": 0}
    )
    async with AsyncRAG(settings, embedder=embedder) as rag:
        await rag.ingest(DOCS)
        fake_upstream.fail_next("500")
        events = await rag.ask_stream(Q)
        with pytest.raises(UpstreamError):  # the upstream 500 surfaces mid-stream
            _ = [e async for e in events]
        assert (await rag.ask(Q)).cache.kind == "miss"


async def test_reingest_same_corpus_makes_no_embedding_calls(
    make_settings: Callable[..., Settings], embedder: LocalEmbedder
) -> None:
    async with AsyncRAG(cached(make_settings), embedder=embedder) as rag:
        await rag.ingest(DOCS)
        await rag.delete([d.id for d in DOCS])  # store empty: only the embedding cache remembers
        calls = embedder.calls
        rep = await rag.ingest(DOCS)
        assert rep.added == len(DOCS) and rep.chunks_embedded == 0
        assert embedder.calls == calls
