"""The whole pipeline in milliseconds: AsyncRAG with HashEmbedder + ScriptedLLM (no model, no services).

Only the public API is used (``AsyncRAG(...)``, ``ingest``, ``search``, ``ask``, ``ask_stream``,
``delete``, ``stats``), so these tests hold across refactors of the pipeline's insides.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ragline.config import Settings
from ragline.embed.base import Embedder
from ragline.errors import InvalidInput
from ragline.llm.base import LLM, GenParams
from ragline.pipeline import AsyncRAG
from ragline.testing import HashEmbedder, ScriptedLLM
from ragline.types import Document

DOCS = [
    Document("paris", "Paris is the capital of France. The Eiffel Tower opened in 1889.", "Paris"),
    Document("cats", "Domestic cats sleep for sixteen hours a day and purr when content.", "Cats"),
    Document("tea", "Green tea contains caffeine and antioxidants called catechins.", "Tea"),
]
QUESTION = "When did the Eiffel Tower open?"


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def make(**cache: Any) -> Settings:
        # L1 + L3 only (no Redis); the semantic cache stays on, as by default
        return Settings(data_dir=tmp_path / "data", cache={"enabled": True, "redis_url": None, **cache})

    return make


@pytest.fixture
def llm() -> ScriptedLLM:
    return ScriptedLLM()


@pytest.fixture
async def rag(make_settings: Callable[..., Settings], llm: ScriptedLLM) -> AsyncIterator[AsyncRAG]:
    async with AsyncRAG(make_settings(), embedder=HashEmbedder(), llm=llm) as r:
        yield r


# --------------------------------------------------------------------------- the fakes themselves


def test_hash_embedder_is_a_deterministic_normalised_embedder() -> None:
    e = HashEmbedder(dim=64)
    assert isinstance(e, Embedder)
    v = e.embed(["Eiffel Tower opened", "Eiffel Tower opened", "green tea catechins", "", "!!!"])
    assert v.shape == (5, 64) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(v[0], v[1])
    np.testing.assert_array_equal(HashEmbedder(dim=64).embed(["Eiffel Tower opened"])[0], v[0])
    close = float(e.embed(["When did the Eiffel Tower open?"])[0] @ v[0])
    far = float(e.embed(["When did the Eiffel Tower open?"])[0] @ v[2])
    assert close > far + 0.3
    assert e.embed([]).shape == (0, 64)
    assert e.tokenizer_file.name == "tokenizer.json" and e.tokenizer_file.is_file()
    assert e.calls == 3 + 1 and e.texts_embedded == 7


async def test_scripted_llm_scripts_echoes_and_counts() -> None:
    llm = ScriptedLLM(["first", "second answer"])
    assert isinstance(llm, LLM)
    params = GenParams(model="m", max_tokens=1)
    msgs = [{"role": "user", "content": "Sources:\n\n[1] T\ntext one\n\nQuestion: why?"}]
    assert (await llm.complete(msgs, GenParams(model="m"))).text == "first"
    out = await llm.complete(msgs, params)
    assert (out.text, out.finish_reason, out.usage.completion_tokens) == ("second", "length", 1)
    chunks = [c async for c in llm.stream(msgs, GenParams(model="m"))]
    assert "".join(c.delta for c in chunks) == "Asked 'why?': text one [1]"
    assert chunks[-1].finish_reason == "stop" and chunks[-1].usage is not None
    assert (llm.calls, llm.complete_calls, llm.stream_calls) == (3, 2, 1)
    by_topic = ScriptedLLM({"cats": "meow [1]"})
    cat = [{"role": "user", "content": "Sources:\n\n[1]\nx\n\nQuestion: do cats purr?"}]
    assert (await by_topic.complete(cat, params)).text == "meow"  # max_tokens=1
    await llm.aclose()
    assert llm.closed


# --------------------------------------------------------------------------- the pipeline


async def test_ingest_search_ask_hit_update_delete(rag: AsyncRAG, llm: ScriptedLLM) -> None:
    rep = await rag.ingest(DOCS)
    assert (rep.documents, rep.added) == (3, 3)
    assert rag.stats() == {"documents": 3, "chunks": 3}
    assert (await rag.ingest(DOCS)).unchanged == 3  # unchanged: nothing rewritten

    hits = await rag.search("Eiffel Tower Paris", k=2)
    assert hits[0].doc_id == "paris" and len(hits) == 2

    first = await rag.ask(QUESTION)
    assert first.cache.kind == "miss" and llm.calls == 1
    assert first.sources[0].doc_id == "paris" and "1889" in first.text
    assert QUESTION.rstrip("?") in llm.prompts[-1][-1]["content"]  # the query form (ragline.canonical)

    again = await rag.ask(QUESTION)
    assert again.cache.kind == "exact" and llm.calls == 1  # an exact hit makes no LLM call
    assert again.text == first.text

    # update the document the answer rests on: the cached answer must not be served again
    await rag.ingest([Document("paris", "Paris is the capital of France. The Eiffel Tower opened in 1890.", "Paris")])
    fresh = await rag.ask(QUESTION)
    assert fresh.cache.kind == "miss" and llm.calls == 2
    assert "1890" in fresh.text and "1889" not in fresh.text
    assert "1890" in fresh.sources[0].text

    assert await rag.delete(["paris"]) == ["paris#0"]
    assert rag.stats() == {"documents": 2, "chunks": 2}
    gone = await rag.ask(QUESTION)
    assert all(h.doc_id != "paris" for h in gone.sources)
    assert "1890" not in gone.text and llm.calls == 3


async def test_unrelated_ingest_keeps_the_cached_answer(rag: AsyncRAG, llm: ScriptedLLM) -> None:
    # k=1: the answer rests on one chunk; a new, unrelated chunk is re-checked and cannot displace it
    await rag.ingest(DOCS)
    await rag.ask(QUESTION, k=1)
    await rag.ingest([Document("bees", "Honey bees dance to tell each other where flowers are.", "Bees")])
    assert (await rag.ask(QUESTION, k=1)).cache.kind == "exact"
    assert llm.calls == 1


async def test_concurrent_identical_asks_make_one_llm_call(make_settings: Callable[..., Settings]) -> None:
    llm = ScriptedLLM(delay_s=0.2)  # long enough for every request to be in flight at once
    async with AsyncRAG(make_settings(), embedder=HashEmbedder(), llm=llm) as rag:
        await rag.ingest(DOCS)
        answers = await asyncio.gather(*(rag.ask(QUESTION) for _ in range(8)))
    assert llm.calls == 1
    assert len({a.text for a in answers}) == 1 and "1889" in answers[0].text


async def test_bypass_always_reaches_the_llm(rag: AsyncRAG, llm: ScriptedLLM) -> None:
    await rag.ingest(DOCS)
    await rag.ask(QUESTION)
    assert (await rag.ask(QUESTION, cache_mode="bypass")).cache.kind == "bypass"
    assert llm.calls == 2


async def test_history_reaches_the_llm_and_is_validated(rag: AsyncRAG, llm: ScriptedLLM) -> None:
    await rag.ingest(DOCS)
    history = [
        {"role": "user", "content": "tell me about Paris"},
        {"role": "assistant", "content": "Paris is in France."},
    ]
    await rag.ask("and the tower?", history=history)
    sent = llm.prompts[-1]
    assert sent[1:3] == history  # after the system prompt, before the question
    assert sent[-1]["role"] == "user" and sent[-1]["content"].endswith("Question: and the tower")
    with pytest.raises(InvalidInput, match="history"):
        await rag.ask("and the tower?", history=[{"role": "system", "content": "x"}])


async def test_stream_events_then_cached_replay(rag: AsyncRAG, llm: ScriptedLLM) -> None:
    await rag.ingest(DOCS)
    events = [e async for e in await rag.ask_stream(QUESTION)]
    names = [name for name, _ in events]
    assert names[0] == "sources" and names[-1] == "done" and set(names[1:-1]) == {"delta"}
    assert len(names) > 3  # streamed in pieces, not one blob
    assert events[0][1]["sources"][0]["doc_id"] == "paris"
    text = "".join(d["text"] for name, d in events if name == "delta")
    assert "1889" in text and llm.stream_calls == 1
    assert events[-1][1]["cache"]["kind"] == "miss"

    replay = [e async for e in await rag.ask_stream(QUESTION)]
    assert replay[0][0] == "sources" and replay[-1][1]["cache"]["kind"] == "exact"
    assert "".join(d["text"] for n, d in replay if n == "delta") == text
    assert llm.calls == 1  # the replay made no LLM call
    assert (await rag.ask(QUESTION)).cache.kind == "exact" and llm.calls == 1


async def test_bad_input_raises_before_any_work(rag: AsyncRAG, llm: ScriptedLLM) -> None:
    with pytest.raises(InvalidInput):
        await rag.ask("   ")
    with pytest.raises(InvalidInput):
        await rag.ask_stream("")
    assert llm.calls == 0


async def test_trivial_variants_are_exact_hits_with_one_llm_call(rag: AsyncRAG, llm: ScriptedLLM) -> None:
    await rag.ingest(DOCS)
    first = await rag.ask(QUESTION)
    assert first.cache.kind == "miss"
    calls = llm.calls
    variants = (
        "when did the eiffel tower open",
        "  When did the Eiffel Tower open.  ",
        "Please tell me about when did the Eiffel Tower open?",
        "I'd like to know when did the Eiffel Tower open",
    )
    for variant in variants:
        body, info = await rag.ask_body(variant)
        assert info.kind == "exact", variant
        body2, info2 = await rag.ask_body(variant)  # the memoised key of the raw text: L1 at once
        assert (info2.kind, info2.tier, body2) == ("exact", "l1", body)
    assert llm.calls == calls
    assert (await rag.ask("When did the Eiffel Tower not open?")).cache.kind != "exact"  # a negation is kept


async def test_retrieval_hands_the_hits_vectors_to_the_context(rag: AsyncRAG, llm: ScriptedLLM) -> None:
    """A fresh retrieval carries its hits' stored vectors (the context's near-duplicate check uses them
    instead of reading them again); one served from the retrieval cache carries none."""
    near = Document("paris2", DOCS[0].text + " Indeed.", "Paris")
    await rag.ingest([*DOCS, near])
    for doc_level in (False, True):
        r = await rag.retrieve("Eiffel Tower Paris", k=4, mmr=True, doc_level=doc_level, cache_mode="bypass")
        assert r.vectors is not None and r.vectors.shape == (len(r.hits), rag.embedder.dim)
        np.testing.assert_array_equal(r.vectors, rag.store.vectors("default", [h.chunk_id for h in r.hits]))
    await rag.retrieve("Eiffel Tower Paris", k=4, mmr=True)
    assert (await rag.retrieve("Eiffel Tower Paris", k=4, mmr=True)).vectors is None  # from the cache
    vecs = rag.store.vectors("default", ["paris#0", "paris2#0"])
    assert float(vecs[0] @ vecs[1]) >= rag.settings.context.near_duplicate  # the premise of the next line
    sources = (await rag.ask("When did the Eiffel Tower in Paris open?", k=4)).sources
    assert len({h.doc_id for h in sources} & {"paris", "paris2"}) == 1  # the near-duplicate was dropped
