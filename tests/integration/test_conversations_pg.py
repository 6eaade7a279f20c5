"""Conversations in the PostgreSQL store (real PostgreSQL 16, ``pgserver``): the ConversationStore
contract, limits, tenant scoping, and two instances serving the turns of one conversation."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragline.config import Settings
from ragline.conversation import Conversations
from ragline.errors import PayloadTooLarge
from ragline.pipeline import AsyncRAG
from ragline.store.base import ConversationStore, Turn
from ragline.store.embedded import EmbeddedStore
from ragline.store.postgres import PostgresStore
from ragline.testing import HashEmbedder, ScriptedLLM
from ragline.types import Document


def contract(store: ConversationStore) -> None:
    """What every ConversationStore does (the embedded one is checked with the same function)."""
    assert store.get("t1", "c") is None
    turns = [Turn("user", "What is BM25?", "What is BM25?"), Turn("assistant", "A ranking [1].", sources=(
        {"doc_id": "bm25", "chunk_id": "bm25#0", "title": "BM25"},))]  # fmt: skip
    assert store.append("t1", "c", turns, max_messages=4, max_conversations=2) == 2
    assert store.append("t1", "c", turns, max_messages=4, max_conversations=2) == 4
    with pytest.raises(PayloadTooLarge, match="max_turns"):
        store.append("t1", "c", turns, max_messages=4, max_conversations=2)
    c = store.get("t1", "c")
    assert c is not None and [t.role for t in c.turns] == ["user", "assistant"] * 2
    assert c.turns[1].sources[0]["doc_id"] == "bm25" and c.turns[0].standalone == "What is BM25?"
    assert store.get("t2", "c") is None  # tenant-scoped
    store.set_summary("t1", "c", "asked about BM25", 2)
    store.set_summary("t1", "c", "older", 0)  # a concurrent, older fold does not win
    c = store.get("t1", "c")
    assert c is not None and (c.summary, c.summarized) == ("asked about BM25", 2)
    store.append("t1", "d", turns, max_messages=4, max_conversations=2)
    with pytest.raises(PayloadTooLarge, match="max_conversations_per_tenant"):
        store.append("t1", "e", turns, max_messages=4, max_conversations=2)
    assert store.get("t1", "e") is None  # the refused append left nothing
    store.append("t2", "e", turns, max_messages=4, max_conversations=2)
    assert store.delete("t1", "c") and not store.delete("t1", "c") and store.get("t1", "c") is None
    assert store.prune(3600) == 0 and store.prune(0) == 2


def test_postgres_conversations(pg_dsn: str) -> None:
    store = PostgresStore(pg_dsn, 8)
    try:
        contract(store.conversations)
    finally:
        store.close()


def test_embedded_conversations(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path, 8)
    try:
        contract(store.conversations)
    finally:
        store.close()


async def test_two_instances_share_a_conversation(pg_dsn: str, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "a", store="postgres", postgres_dsn=pg_dsn, cache={"enabled": False})
    settings_b = settings.model_copy(update={"data_dir": tmp_path / "b"})
    docs = [
        Document("bm25", "BM25 is a ranking function that scores documents for keyword queries.", "BM25"),
        Document("eiffel", "The Eiffel Tower in Paris opened in 1889 for the World's Fair.", "Eiffel Tower"),
    ]
    async with (
        AsyncRAG(settings, embedder=HashEmbedder(), llm=ScriptedLLM()) as a,
        AsyncRAG(settings_b, embedder=HashEmbedder(), llm=ScriptedLLM()) as b,
    ):
        await a.ingest(docs, "t")
        ca, cb = Conversations(a), Conversations(b)
        p1 = await ca.prepare("t", "What is BM25?", conversation_id="x")
        await ca.ask_body(p1, 1, "default", None)
        p2 = await cb.prepare("t", "tell me more about it", conversation_id="x")  # the other instance
        assert p2.turn == 2 and "BM25" in p2.standalone
        body, _ = await cb.ask_body(p2, 1, "default", None)
        assert b'"doc_id":"bm25"' in body
        assert (await ca.get("t", "x"))["turns"] == 2
