"""``ragline reembed``: switching embedders re-embeds the stored corpus in place, and nothing is lost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from ragline.assembly import check_embedder
from ragline.config import Settings
from ragline.errors import ConfigError
from ragline.ingest.reembed import REEMBEDDING, reembed_store
from ragline.pipeline import AsyncRAG
from ragline.store.embedded import EmbeddedStore
from ragline.testing import HashEmbedder
from ragline.types import Document, Vectors

DOCS = [
    Document("a", "BM25 ranks documents by term frequency and inverse document frequency.", title="BM25"),
    Document("b", "Dense retrieval embeds queries and passages into one vector space.", title="Dense"),
    Document("c", "Reciprocal rank fusion merges rankings without calibrating their scores."),
]


class RolledEmbedder(HashEmbedder):
    """Another vector space: the hash embedder's vectors, rotated by one slot (still unit length)."""

    def embed(self, texts: list[str]) -> Vectors:
        return np.roll(super().embed(texts), 1, axis=1)


def _settings(tmp: Path) -> Settings:
    return Settings(data_dir=tmp, cache={"enabled": False})


async def _ingest(tmp: Path, docs: list[Document] = DOCS) -> None:
    async with AsyncRAG(_settings(tmp), embedder=HashEmbedder(model_id="hash:old")) as rag:
        await rag.ingest(docs)


async def test_reembed_replaces_every_vector_and_records_the_new_embedder(tmp_path: Path) -> None:
    await _ingest(tmp_path)
    new = RolledEmbedder(model_id="hash:new")
    store = EmbeddedStore(tmp_path, new.dim)
    before = store.stats()
    ids = [cid for st in store.doc_state("default", ["a", "b", "c"]).values() for cid in st.chunk_ids]
    chunks = store.chunks("default", ids)
    seen: list[tuple[str, int, int]] = []
    report = reembed_store(store, new, batch_docs=2, progress=lambda t, d, c: seen.append((t, d, c)))
    assert report.previous == "hash:old" and report.embedder == "hash:new"
    assert report.documents == {"default": 3} and report.chunks == {"default": len(ids)} and report.skipped == 0
    assert seen[-1] == ("default", 3, len(ids)) and len(seen) == 2  # two batches of at most 2 documents
    assert store.meta("embedder") == "hash:new"
    assert store.stats() == before  # same documents, same chunks
    want = new.embed([chunks[c].index_text for c in ids])
    assert np.allclose(store.vectors("default", ids), want, atol=1e-6)
    assert store.chunks("default", ids) == chunks  # texts, hashes and metadata untouched
    top = store.search_dense("default", new.embed(["reciprocal rank fusion merges rankings"])[0], 1)
    assert top[0].chunk_id.startswith("c#")
    assert store.search_keyword("default", "idf frequency", 3)[0].chunk_id.startswith("a#")
    store.close()
    # the old embedder is now refused, with the way back in the message; the new one opens the store
    with pytest.raises(ConfigError, match="ragline reembed"):
        async with AsyncRAG(_settings(tmp_path), embedder=HashEmbedder(model_id="hash:old")):
            pass
    async with AsyncRAG(_settings(tmp_path), embedder=new) as rag:
        hits = await rag.search("dense retrieval vector space", 1)
        assert hits[0].doc_id == "b"


async def test_another_process_follows_the_new_vectors(tmp_path: Path) -> None:
    await _ingest(tmp_path)
    new = RolledEmbedder(model_id="hash:new")
    writer, reader = EmbeddedStore(tmp_path, new.dim), EmbeddedStore(tmp_path, new.dim)
    q = new.embed(["reciprocal rank fusion merges rankings"])[0]
    reembed_store(writer, new)
    reader.sync()
    assert reader.search_dense("default", q, 1)[0].chunk_id.startswith("c#")
    ids = [f"{d}#0" for d in "abc"]
    assert np.allclose(reader.vectors("default", ids), writer.vectors("default", ids))
    writer.close()
    reader.close()


async def test_an_interrupted_run_is_refused_until_it_is_finished(tmp_path: Path) -> None:
    await _ingest(tmp_path)
    new = RolledEmbedder(model_id="hash:new")

    class Crashing(RolledEmbedder):
        def embed(self, texts: list[str]) -> Vectors:
            raise RuntimeError("killed")

    store = EmbeddedStore(tmp_path, new.dim)
    with pytest.raises(RuntimeError):
        reembed_store(store, Crashing(model_id="hash:new"))
    assert store.meta("embedder") == REEMBEDDING + "hash:new"
    for emb_id in ("hash:old", "hash:new"):
        with pytest.raises(ConfigError, match="being re-embedded"):
            check_embedder(store, emb_id, "m")
    reembed_store(store, new)  # run again: done
    check_embedder(store, "hash:new", "m")
    store.close()


async def test_a_document_changed_meanwhile_keeps_its_new_content(tmp_path: Path) -> None:
    await _ingest(tmp_path)
    store = EmbeddedStore(tmp_path, 384)
    updated = Document("b", "Rewritten while the re-embed ran: nothing about vectors here.")
    raced: dict[str, bool] = {}

    class Racing(RolledEmbedder):
        """Embeds, and meanwhile another writer re-ingests document b (once)."""

        def embed(self, texts: list[str]) -> Vectors:
            if not raced:
                raced["done"] = True
                old = HashEmbedder(model_id="hash:old")
                chunk = store.chunks("default", ["b#0"])["b#0"]
                from dataclasses import replace

                fresh = replace(chunk, text=updated.text, content_hash="changed")
                store.upsert("default", [(updated, "changed-doc", [fresh], old.embed([fresh.index_text]))])
            return super().embed(texts)

    report = reembed_store(store, Racing(model_id="hash:new"))
    assert report.skipped == 1 and report.documents == {"default": 2}
    assert store.chunks("default", ["b#0"])["b#0"].text == updated.text  # the concurrent write is not undone
    assert store.doc_state("default", ["b"])["b"].content_hash == "changed-doc"
    store.close()


def test_cli_reembed_reports_and_a_bad_batch_is_a_usage_error(tmp_path: Path, monkeypatch: Any) -> None:
    import asyncio

    from ragline import assembly
    from ragline.cli import app

    asyncio.run(_ingest(tmp_path))
    monkeypatch.setattr(assembly, "build_embedder", lambda e: RolledEmbedder(model_id="hash:new"))
    runner = CliRunner()
    res = runner.invoke(app, ["reembed", "--data-dir", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    assert '"embedder": "hash:new"' in res.stdout and '"previous": "hash:old"' in res.stdout
    bad = runner.invoke(app, ["reembed", "--data-dir", str(tmp_path), "--batch", "0"])
    assert bad.exit_code == 2 and "batch_docs must be at least 1" in bad.output


async def test_a_document_whose_chunks_cannot_all_be_read_is_skipped_not_truncated(tmp_path: Path) -> None:
    long = Document("long", " ".join(f"Sentence {i} about dense retrieval and rank fusion." for i in range(120)))
    await _ingest(tmp_path, [*DOCS, long])
    store = EmbeddedStore(tmp_path, 384)
    n_chunks = len(store.doc_state("default", ["long"])["long"].chunk_ids)
    assert n_chunks > 1

    class Lossy:  # the real store, except that one chunk of "long" is missing from a read
        def chunks(self, tenant: str, ids: list[str]) -> Any:
            return {c: ch for c, ch in store.chunks(tenant, ids).items() if c != "long#1"}

        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

    report = reembed_store(Lossy(), RolledEmbedder(model_id="hash:new"))  # type: ignore[arg-type]
    assert report.skipped == 1 and report.documents == {"default": 3}
    assert len(store.doc_state("default", ["long"])["long"].chunk_ids) == n_chunks  # nothing of it was lost
    store.close()
