"""ingest → search → ask through the Python API, on the real model and embedded store."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ragline import RAG
from ragline.config import Settings
from ragline.embed.local import LocalEmbedder
from ragline.errors import InvalidInput, NotFound, PayloadTooLarge, UnsupportedFile
from ragline.pipeline import AsyncRAG
from ragline.types import Document

DOCS = [
    Document(
        "cats", "Cats are small carnivorous mammals. Domestic cats sleep for up to sixteen hours a day.", title="Cats"
    ),
    Document(
        "rrf",
        "Reciprocal rank fusion combines ranked lists. Each document scores the sum of one over "
        "sixty plus its rank in every list.",
        title="Reciprocal rank fusion",
    ),
    Document("paris", "Paris is the capital of France. The Eiffel Tower was completed in 1889.", title="Paris"),
]


async def test_ingest_search_ask(rag: AsyncRAG) -> None:
    rep = await rag.ingest(DOCS)
    assert (rep.added, rep.chunks_added, rep.chunks_embedded) == (3, 3, 3)
    hits = await rag.search("how long do cats sleep", k=3)
    assert hits[0].doc_id == "cats"
    assert hits[0].dense_rank == 1 and hits[0].keyword_rank == 1
    assert hits[0].dense_score is not None and hits[0].keyword_score is not None
    answer = await rag.ask("When was the Eiffel Tower completed?")
    assert "1889" in answer.text
    cited = {int(n) for n in re.findall(r"\[(\d+)\]", answer.text)}
    assert cited and all(1 <= n <= len(answer.sources) for n in cited)
    assert answer.sources[min(cited) - 1].doc_id == "paris"
    assert {"embed", "retrieve", "context", "generate", "total"} <= set(answer.timings)


async def test_doc_level_results_one_hit_per_document(rag: AsyncRAG) -> None:
    long = Document("long", " ".join(f"Sentence {i} talks about fusion of ranked lists." for i in range(200)))
    await rag.ingest([*DOCS, long])
    hits = await rag.search("fusion of ranked lists", k=10, doc_level=True)
    assert len({h.doc_id for h in hits}) == len(hits)
    chunk_hits = await rag.search("fusion of ranked lists", k=10)
    assert sum(h.doc_id == "long" for h in chunk_hits) > 1


async def test_reingest_unchanged_embeds_nothing_and_update_replaces(rag: AsyncRAG, embedder: LocalEmbedder) -> None:
    await rag.ingest(DOCS)
    before = embedder.texts_embedded
    rep = await rag.ingest(DOCS)
    assert rep.unchanged == 3 and rep.chunks_embedded == 0
    assert embedder.texts_embedded == before
    new = Document("paris", "Paris hosts the Louvre museum, home of the Mona Lisa.", title="Paris")
    rep = await rag.ingest([new])
    assert (rep.updated, rep.chunks_removed, rep.chunks_added) == (1, 1, 1)
    hits = await rag.search("Eiffel Tower 1889", k=5)
    assert all("Eiffel" not in h.text for h in hits)
    assert (await rag.search("Mona Lisa museum", k=1))[0].doc_id == "paris"
    assert rag.stats() == {"documents": 3, "chunks": 3}


async def test_delete_and_not_found(rag: AsyncRAG) -> None:
    await rag.ingest(DOCS)
    removed = await rag.delete(["cats"])
    assert removed == ["cats#0"]
    assert all(h.doc_id != "cats" for h in await rag.search("cats sleep", k=5))
    with pytest.raises(NotFound, match="cats"):
        await rag.delete(["cats"])


async def test_restart_reloads_from_disk_without_embedding(
    make_settings: Callable[..., Settings], embedder: LocalEmbedder
) -> None:
    settings = make_settings()
    async with AsyncRAG(settings, embedder=embedder) as rag:
        await rag.ingest(DOCS)
    before = embedder.texts_embedded
    async with AsyncRAG(settings, embedder=embedder) as rag:
        assert rag.stats() == {"documents": 3, "chunks": 3}
        hits = await rag.search("capital of France", k=1)
        assert hits[0].doc_id == "paris" and hits[0].dense_rank == 1
        rep = await rag.ingest(DOCS)
        assert rep.unchanged == 3
    assert embedder.texts_embedded == before + 1  # only the query


async def test_crash_recovery_rebuilds_indexes_from_sqlite(
    make_settings: Callable[..., Settings], embedder: LocalEmbedder
) -> None:
    """A process killed after ingest (no close: dense index never saved) loses nothing."""
    settings = make_settings()
    code = (
        "import asyncio, os, sys\n"
        "from ragline.config import Settings\n"
        "from ragline.pipeline import AsyncRAG\n"
        "from tests.integration.test_pipeline import DOCS\n"
        "async def main():\n"
        "    rag = AsyncRAG(Settings(data_dir=sys.argv[1]))\n"
        "    await rag.ingest(DOCS)\n"
        "    os._exit(0)\n"
        "asyncio.run(main())\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(settings.data_dir)],
        check=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert not (settings.data_dir / "tenants" / "default" / "dense.usearch").exists()
    before = embedder.texts_embedded
    async with AsyncRAG(settings, embedder=embedder) as rag2:
        assert rag2.stats() == {"documents": 3, "chunks": 3}
        hits = await rag2.search("Eiffel Tower", k=1)
        assert hits[0].doc_id == "paris" and hits[0].dense_rank == 1 and hits[0].keyword_rank == 1
    assert embedder.texts_embedded == before + 1


async def test_ingest_files_and_sample_corpus(rag: AsyncRAG, tmp_path: Path) -> None:
    from tests.fixtures.rag import SAMPLE_DOCS

    rep = await rag.ingest_paths([SAMPLE_DOCS])
    assert rep.added >= 5 and not rep.errors
    answer = await rag.ask("What does reciprocal rank fusion do?")
    assert (answer.sources and "[1]" in answer.text) or "[2]" in answer.text
    (tmp_path / "x.docx").write_bytes(b"PK\x03\x04")
    with pytest.raises(UnsupportedFile):
        await rag.ingest_paths([tmp_path / "x.docx"])


async def test_bad_inputs_are_clear_and_lose_nothing(rag: AsyncRAG) -> None:
    await rag.ingest(DOCS)
    with pytest.raises(InvalidInput, match="empty"):
        await rag.search("   ")
    with pytest.raises(PayloadTooLarge, match="limit"):
        await rag.search("x" * 10_000)
    with pytest.raises(InvalidInput, match="k must be"):
        await rag.search("cats", k=0)
    with pytest.raises(InvalidInput, match="k must be"):
        await rag.search("cats", k=10_000)
    with pytest.raises(InvalidInput):
        await rag.ingest([Document("empty", "   ")])
    with pytest.raises(InvalidInput, match="history"):
        await rag.ask("cats?", history=[{"role": "system", "content": "x"}])
    assert rag.stats() == {"documents": 3, "chunks": 3}


async def test_ingest_is_atomic_per_batch(rag: AsyncRAG) -> None:
    """A bad document in a request fails validation before anything is written."""
    with pytest.raises(InvalidInput):
        await rag.ingest([DOCS[0], Document("bad", "")])
    assert rag.stats() == {"documents": 0, "chunks": 0}


async def test_tenants_are_isolated(rag: AsyncRAG) -> None:
    await rag.ingest(DOCS[:1], tenant="a")
    await rag.ingest(DOCS[1:], tenant="b")
    assert {h.doc_id for h in await rag.search("cats sleep", k=5, tenant="a")} == {"cats"}
    assert "cats" not in {h.doc_id for h in await rag.search("cats sleep", k=5, tenant="b")}
    assert await rag.search("cats", k=5, tenant="nobody") == []


def test_sync_facade(make_settings: Callable[..., Settings], embedder: LocalEmbedder) -> None:
    with RAG(make_settings(), embedder=embedder) as rag:
        rag.ingest(DOCS)
        assert rag.search("capital of France", k=1)[0].doc_id == "paris"
        assert "1889" in rag.ask("When was the Eiffel Tower completed?").text
        assert rag.delete(["paris"]) == ["paris#0"]
