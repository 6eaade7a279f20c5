"""Multi-query retrieval (ragline.multiquery + HybridRetriever's expand hook): rewrites, LLM parsing, fusion."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ragline.config import RetrievalSettings, Settings
from ragline.errors import UpstreamError
from ragline.multiquery import MultiQuery, cheap_variants, parse_variants
from ragline.pipeline import AsyncRAG
from ragline.retrieve import HybridRetriever
from ragline.testing import HashEmbedder, ScriptedLLM
from ragline.types import Chunk, Document, Message, Scored, Vectors


def test_cheap_variants_are_term_subsets_distinct_from_the_query() -> None:
    q = "What is the role of the BRCA1 gene in hereditary breast cancer?"
    out = cheap_variants(q, 3)
    # content words; the three longest keywords (the same words as the longest content run: one variation)
    assert out == ["role BRCA1 gene hereditary breast cancer", "hereditary breast cancer"]
    words = {w.lower() for w in q.replace("?", "").split()}
    assert all({w.lower() for w in v.split()} <= words for v in out)  # keyword lists stay within its terms
    assert cheap_variants(q, 1) == out[:1]
    assert cheap_variants("cats", 3) == [] and cheap_variants("", 3) == []


def test_parse_variants_strips_numbering_and_drops_repeats() -> None:
    reply = '1. BM25 ranking function\n2) "how BM25 scores documents"\n- bm25 ranking function\n\nHow does BM25 work?'
    assert parse_variants(reply, "How does BM25 work?", 5) == ["BM25 ranking function", "how BM25 scores documents"]
    assert parse_variants("x" * 1000, "q", 1) == ["x" * 300]


class _Lists:
    """A store whose dense results depend on the query vector's first component (which query asked)."""

    def __init__(self) -> None:
        self.dense_calls = 0
        self.keyword_queries: list[str] = []

    def search_dense(self, tenant: str, vector: Vectors, k: int) -> list[Scored]:
        self.dense_calls += 1
        first = "a" if float(vector[0]) > 0 else "b"
        return [Scored(first, 0.9), Scored("shared", 0.8)]

    def search_keyword(self, tenant: str, query: str, k: int) -> list[Scored]:
        self.keyword_queries.append(query)
        return [Scored("shared", 5.0)]

    def chunks(self, tenant: str, chunk_ids: list[str]) -> dict[str, Chunk]:
        return {c: Chunk(c, c, 0, c, "t", c) for c in chunk_ids}

    def vectors(self, tenant: str, chunk_ids: list[str]) -> Vectors:
        return np.eye(len(chunk_ids), 4, dtype=np.float32)


async def test_variations_are_fused_with_rrf_and_llm_ones_are_dense_only() -> None:
    store = _Lists()
    plus, minus = np.array([1, 0, 0, 0], np.float32), np.array([-1, 0, 0, 0], np.float32)

    async def expand(tenant: str, query: str) -> list[tuple[str, Vectors, bool]]:
        return [("rewrite", minus, True), ("paraphrase", minus, False)]

    on = RetrievalSettings(multi_query=True, mmr=False)
    r = await HybridRetriever(store, on, expand).retrieve("t", "query", plus, 3)
    # "shared" is in all five lists, "b" in both variations' dense lists, "a" only in the query's
    assert [h.chunk_id for h in r.hits] == ["shared", "b", "a"]
    assert store.dense_calls == 3 and sorted(store.keyword_queries) == ["query", "rewrite"]  # paraphrase: dense only
    assert r.dense_cutoff is None and r.keyword_cutoff is None  # invalidation: any new chunk re-verifies
    off = await HybridRetriever(store, RetrievalSettings(mmr=False), expand).retrieve("t", "query", plus, 3)
    assert [h.chunk_id for h in off.hits] == ["shared", "a"]  # setting off: the hook is not called


async def test_multi_query_uses_the_llm_when_there_is_one_and_falls_back_to_rewrites() -> None:
    asked: list[str] = []

    async def embed(tenant: str, text: str) -> Vectors:
        asked.append(text)
        return np.ones(4, np.float32)

    async def complete(tenant: str, messages: list[Message]) -> str:
        return "Eiffel Tower opening year\nwhen was the Eiffel Tower inaugurated"

    mq = MultiQuery(2, embed, complete)
    got = await mq("t", "When did the Eiffel Tower open?")
    assert [(t, kw) for t, _, kw in got] == [("Eiffel Tower opening year", False),
                                            ("when was the Eiffel Tower inaugurated", False)]  # fmt: skip
    assert asked == [t for t, _, _ in got]

    async def down(tenant: str, messages: list[Message]) -> str:
        raise UpstreamError("upstream down")

    fallback = await MultiQuery(2, embed, down).variants("t", "When did the Eiffel Tower open?")
    assert fallback == [("Eiffel Tower open", True)]  # all three rewrites coincide here: one


async def test_pipeline_with_multi_query_answers_and_changes_the_fingerprint(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path / "d", cache={"enabled": False}, retrieval={"multi_query": True})
    assert s.fingerprint() != Settings(data_dir=tmp_path / "d").fingerprint()
    llm = ScriptedLLM()
    async with AsyncRAG(s, embedder=HashEmbedder(), llm=llm) as rag:
        await rag.ingest([Document("paris", "The Eiffel Tower in Paris opened in 1889.", "Paris"),
                          Document("tea", "Green tea contains catechins.", "Tea")])  # fmt: skip
        hits = await rag.search("When did the Eiffel Tower open?", 2)
        assert hits[0].doc_id == "paris"
        assert llm.calls == 0  # the extractive/scripted provider setting is "extractive": cheap rewrites
