"""The PostgreSQL store against a real PostgreSQL 16 + pgvector (``pgserver``): the Store protocol,
BM25 parity with the embedded store, two instances on one database, and the pipeline on top."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ragline.config import Settings
from ragline.errors import StoreError
from ragline.ingest.chunking import doc_hash
from ragline.pipeline import AsyncRAG
from ragline.store.embedded import EmbeddedStore
from ragline.store.postgres import PostgresStore
from ragline.testing import HashEmbedder, ScriptedLLM
from ragline.types import Chunk, Document

TEXTS = {
    "paris": "Paris is the capital of France. The Eiffel Tower opened in 1889 and draws millions.",
    "cats": "Domestic cats sleep for sixteen hours a day and purr when content.",
    "tea": "Green tea contains caffeine and antioxidants called catechins; tea is drunk hot.",
    "rome": "Rome was founded on seven hills beside the river Tiber, says the legend.",
    "owls": "Owls hunt at night and swallow their prey whole; owls cough up pellets.",
    "bees": "Honey bees dance to tell the hive where flowers bloom and nectar flows.",
    "coffee": "Coffee has more caffeine than green tea, and coffee is drunk hot or cold.",
    "tower": "Tower cranes lift steel beams; the tallest tower cranes top eighty metres.",
}
EMB = HashEmbedder()


def rows(ids: list[str], suffix: str = "") -> list[tuple[Document, str, list[Chunk], Any]]:
    out = []
    for i in ids:
        doc = Document(i, TEXTS[i] + suffix, i.title())
        ch = Chunk(f"{i}#0", i, 0, doc.text, doc.title, doc_hash(doc), {})
        out.append((doc, doc_hash(doc), [ch], EMB.embed([ch.index_text])))
    return out


def test_the_store_protocol(pg_dsn: str) -> None:
    s = PostgresStore(pg_dsn, EMB.dim)
    try:
        change = s.upsert("t1", rows(list(TEXTS)))
        assert change.seq > 0 and set(change.added) == {f"{i}#0" for i in TEXTS} and "caffein" in change.terms
        assert [h.chunk_id for h in s.search_keyword("t1", "caffeine tea", 3)][:2] == ["tea#0", "coffee#0"]
        assert s.search_dense("t1", EMB.embed([TEXTS["owls"]])[0], 1)[0].chunk_id == "owls#0"
        assert s.search_keyword("t2", "caffeine", 3) == [] and s.search_dense("t2", EMB.embed(["x"])[0], 3) == []
        assert s.stats("t1") == {"documents": 8, "chunks": 8} and s.document_ids("t1", 2) == ["bees", "cats"]
        assert s.doc_state("t1", ["tea", "nope"])["tea"].chunk_ids == ("tea#0",)
        assert s.chunks("t1", ["tea#0"])["tea#0"].text == TEXTS["tea"]
        v = s.vectors("t1", ["tea#0", "missing"])
        assert np.allclose(v[0], EMB.embed([f"Tea\n{TEXTS['tea']}"])[0], atol=1e-6) and not v[1].any()
        same = s.upsert("t1", rows(["tea"]))  # an identical replacement is no change to any retrieval
        assert same.removed == () and same.added == ()
        upd = s.upsert("t1", rows(["tea"], " Matcha is powdered."))
        assert upd.removed == ("tea#0",) and upd.added == ("tea#0",) and "matcha" in upd.terms
        gone = s.delete("t1", ["tea", "nope"])
        assert gone.removed == ("tea#0",) and s.stats("t1")["chunks"] == 7
        assert "tea#0" not in [h.chunk_id for h in s.search_keyword("t1", "matcha tea", 5)]
        with pytest.raises(StoreError):  # a bad batch rolls back whole
            doc, h, chunks, _ = rows(["tea"])[0]
            s.upsert("t1", [rows(["bees"], " more")[0], (doc, h, chunks, np.zeros((0, EMB.dim), np.float32))])
        assert s.chunks("t1", ["bees#0"])["bees#0"].text == TEXTS["bees"] and s.stats("t1")["chunks"] == 7
    finally:
        s.close()


def test_bm25_ranks_like_the_embedded_store(pg_dsn: str, tmp_path: Path) -> None:
    pg, emb = PostgresStore(pg_dsn, EMB.dim), EmbeddedStore(tmp_path, EMB.dim)
    try:
        queries = ("caffeine tea", "tower cranes steel", "the owls hunt at night", "hot drinks coffee", "Eiffel")
        for store in (pg, emb):
            store.upsert("t", rows(list(TEXTS)))
        for q in queries:
            a, b = pg.search_keyword("t", q, 5), emb.search_keyword("t", q, 5)
            assert [h.chunk_id for h in a] == [h.chunk_id for h in b], q
            for x, y in zip(a, b, strict=True):  # tantivy stores lengths in one byte: scores differ slightly
                assert x.score == pytest.approx(y.score, rel=0.05), q
        for store in (pg, emb):
            store.delete("t", ["rome"])
        for q in queries:  # tantivy counts deleted documents in N and df until a merge purges them
            assert [h.chunk_id for h in pg.search_keyword("t", q, 5)] == [
                h.chunk_id for h in emb.search_keyword("t", q, 5)
            ]
    finally:
        pg.close()
        emb.close()


def test_two_instances_see_each_others_changes(pg_dsn: str) -> None:
    a, b = PostgresStore(pg_dsn, EMB.dim), PostgresStore(pg_dsn, EMB.dim)
    try:
        v0 = b.version()
        change = a.upsert("t", rows(["owls", "bees"]))
        deadline = time.monotonic() + 5
        while b.version() == v0 and time.monotonic() < deadline:  # NOTIFY, or the 1 s poll
            time.sleep(0.02)
        assert b.version() != b.synced_version()
        assert [c.seq for c in b.sync()] == [change.seq] and b.sync() == []
        assert a.sync() == []  # its own change is not reported back to it
        assert b.search_keyword("t", "owls", 1)[0].chunk_id == "owls#0"
    finally:
        a.close()
        b.close()


def test_a_bad_dsn_names_the_problem_and_not_the_password() -> None:
    with pytest.raises(StoreError) as err:
        PostgresStore("postgresql://u:s3cret-pw@127.0.0.1:1/db?connect_timeout=1", EMB.dim)
    assert "s3cret-pw" not in str(err.value) and "postgres_dsn" in str(err.value)


def _settings(data_dir: Path, dsn: str) -> Settings:
    return Settings(
        data_dir=data_dir,
        store="postgres",
        postgres_dsn=dsn,
        cache={"enabled": True, "redis_url": None, "semantic": False},
        retrieval={"k": 2, "candidates": 4},
        context={"max_sources": 2},
    )


async def test_two_pipelines_on_one_database(pg_dsn: str, tmp_path: Path) -> None:
    """Two instances (own data dir each: own L1 and L3) on one PostgreSQL: one corpus."""
    a = await AsyncRAG(_settings(tmp_path / "a", pg_dsn), embedder=HashEmbedder(), llm=ScriptedLLM()).start()
    b = await AsyncRAG(_settings(tmp_path / "b", pg_dsn), embedder=HashEmbedder(), llm=ScriptedLLM()).start()
    try:
        await a.ingest([Document(i, t, i.title()) for i, t in TEXTS.items()])
        q = "When did the Eiffel Tower open?"
        deadline = time.monotonic() + 5
        while not await b.search("Eiffel Tower", cache_mode="bypass") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (await b.ask(q)).cache.kind == "miss" and (await b.ask(q)).cache.kind == "exact"
        await a.ingest([Document("paris", "The Eiffel Tower opened in March 1889 after two years of work.", "Paris")])
        deadline = time.monotonic() + 5
        while b.store.version() == b.store.synced_version() and time.monotonic() < deadline:
            time.sleep(0.02)
        served, fresh = await b.ask(q), await b.ask(q, cache_mode="bypass")
        assert {(s.chunk_id, s.text) for s in served.sources} == {(s.chunk_id, s.text) for s in fresh.sources}
        assert any("March" in s.text for s in served.sources)
    finally:
        await a.aclose()
        await b.aclose()


def test_ragline_migrate_copies_an_embedded_data_dir(pg_dsn: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ragline.cli import app

    emb = EmbeddedStore(tmp_path / "data", EMB.dim)
    emb.upsert("t", rows(list(TEXTS)))
    emb.upsert("u", rows(["owls"]))
    emb.close()
    r = CliRunner().invoke(app, ["migrate", "--data-dir", str(tmp_path / "data"), "--to", pg_dsn])
    assert r.exit_code == 0, r.output
    pg = PostgresStore(pg_dsn, EMB.dim)
    try:
        assert pg.stats("t") == {"documents": 8, "chunks": 8} and pg.stats("u")["chunks"] == 1
        assert pg.search_keyword("t", "caffeine tea", 1)[0].chunk_id == "tea#0"
        assert pg.search_dense("u", EMB.embed([f"Owls\n{TEXTS['owls']}"])[0], 1)[0].chunk_id == "owls#0"
        again = CliRunner().invoke(app, ["migrate", "--data-dir", str(tmp_path / "data"), "--to", pg_dsn])
        assert again.exit_code == 0 and pg.stats("t")["chunks"] == 8  # running it twice changes nothing
    finally:
        pg.close()
    bad = CliRunner().invoke(app, ["migrate", "--data-dir", str(tmp_path / "none"), "--to", pg_dsn])
    assert bad.exit_code == 2 and "no embedded store" in bad.output


def test_reembed_in_place_on_postgres(pg_dsn: str) -> None:
    """``ragline reembed``'s core on PostgreSQL: every vector replaced, chunks and keyword index kept, and
    another instance on the database serves the new vectors."""
    from ragline.ingest.reembed import reembed_store

    class Rolled(HashEmbedder):
        def embed(self, texts: list[str]) -> Any:
            return np.roll(super().embed(texts), 1, axis=1)

    a, b = PostgresStore(pg_dsn, EMB.dim), PostgresStore(pg_dsn, EMB.dim)
    try:
        a.upsert("t", rows(list(TEXTS)))
        a.upsert("u", rows(["owls"]))
        a.set_meta("embedder", EMB.id)
        new = Rolled(model_id="hash:rolled")
        report = reembed_store(a, new, batch_docs=3)
        assert report.documents == {"t": 8, "u": 1} and report.previous == EMB.id and a.meta("embedder") == new.id
        assert a.stats("t") == {"documents": 8, "chunks": 8}
        want = new.embed([f"Owls\n{TEXTS['owls']}"])
        assert np.allclose(a.vectors("u", ["owls#0"]), want, atol=1e-6)
        assert a.search_keyword("t", "caffeine tea", 1)[0].chunk_id == "tea#0"
        assert b.search_dense("t", new.embed([f"Cats\n{TEXTS['cats']}"])[0], 1)[0].chunk_id == "cats#0"
        assert a.documents("t", ["tea"])["tea"].title == "Tea"
    finally:
        a.close()
        b.close()
