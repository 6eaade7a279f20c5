"""Retrieval equivalence on BEIR SciFact: the same rankings before and after a refactor.

    python benchmarks/equivalence.py [--data ../shared/data/scifact] [--embeddings PATH] [--out FILE]
    PYTHONPATH=/path/to/old/checkout python benchmarks/equivalence.py --out before.json   # the old code

Ingests the whole SciFact corpus through the public API (``AsyncRAG.ingest``) and runs every test query
through ``AsyncRAG.search`` (document level, 300 candidates, as ``benchmarks/quality.py`` does) in three
modes: BM25 only, dense only and hybrid (RRF). Reports nDCG@10 and Recall@100 (ranx) per mode, plus a
SHA-256 over every ranked list with its scores, so two runs can be compared for identity, not only for
equal averages. MiniLM vectors are memoised by text (``--embeddings``, the same memo format as
``benchmarks/churn.py``), so both sides of a comparison rank with identical vectors and only the code differs.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

import ragline
from ragline import AsyncRAG, Settings
from ragline.config import EmbedderSettings
from ragline.embed.local import LocalEmbedder
from ragline.ingest.loaders import iter_documents


# Self-contained on purpose: this script must import the ragline that PYTHONPATH names (an old checkout), and
# benchmarks/_common.py puts *this* checkout first on sys.path, so neither its load_beir nor churn.py's
# MemoEmbedder (which imports it) can be used here. The memo file format is the same as churn.py's.
class Memo:
    """The real model behind a text → vector memo saved as ``PATH.json`` (texts) + ``PATH.npy``."""

    def __init__(self, inner: LocalEmbedder, path: Path | None) -> None:
        self.inner = inner
        self.id = inner.id
        self.dim = inner.dim
        self.path = path
        self.memo: dict[str, Any] = {}
        self.misses = 0
        if path is not None and path.with_suffix(".json").exists():
            texts = orjson.loads(path.with_suffix(".json").read_bytes())
            self.memo = dict(zip(texts, np.load(path.with_suffix(".npy")), strict=True))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def embed(self, texts: list[str]) -> Any:
        todo = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if todo:
            self.misses += len(todo)
            for t, v in zip(todo, self.inner.embed(todo), strict=True):
                self.memo[t] = v
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self.memo[t] for t in texts])

    def save(self) -> None:
        if self.path is not None and self.misses:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            np.save(self.path.with_suffix(".npy"), np.stack(list(self.memo.values())))
            self.path.with_suffix(".json").write_bytes(orjson.dumps(list(self.memo)))


def load_beir(folder: Path) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    qrels: dict[str, dict[str, int]] = {}
    for line in (folder / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        parts = line.strip().split("\t")
        if len(parts) == 3:
            qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    queries = {}
    for raw in (folder / "queries.jsonl").read_bytes().splitlines():
        q = orjson.loads(raw)
        if str(q["_id"]) in qrels:
            queries[str(q["_id"])] = q["text"]
    return queries, qrels


async def main(data: Path, embeddings: Path | None) -> dict[str, Any]:
    from ranx import Qrels, Run, evaluate

    queries, qrels = load_beir(data)
    docs = list(iter_documents([data / "corpus.jsonl"], Settings().limits))
    memo = Memo(LocalEmbedder(EmbedderSettings()), embeddings)
    report: dict[str, Any] = {
        "ragline": str(Path(ragline.__file__).parent),
        "documents": len(docs),
        "queries": len(queries),
    }
    with tempfile.TemporaryDirectory(prefix="ragline-equiv-") as tmp:
        base = {"data_dir": Path(tmp) / "data", "cache": {"enabled": False}}
        t0 = time.perf_counter()
        async with AsyncRAG(Settings(**base), embedder=memo) as rag:  # type: ignore[arg-type]
            rep = await rag.ingest(docs)
        report["ingest"] = {"chunks": rep.chunks_added, "seconds": round(time.perf_counter() - t0, 2)}
        modes = {"bm25": {"dense": False}, "dense": {"keyword": False}, "hybrid": {}}
        for name, over in modes.items():
            settings = Settings(**base, retrieval={"candidates": 300, "mmr": False, **over})
            async with AsyncRAG(settings, embedder=memo) as rag:  # type: ignore[arg-type]
                run: dict[str, dict[str, float]] = {}
                digest = hashlib.sha256()
                for qid, text in queries.items():
                    hits = await rag.search(text, k=100, doc_level=True)
                    run[qid] = {h.doc_id: float(100 - i) for i, h in enumerate(hits)} or {"__none__": 0.0}
                    digest.update(orjson.dumps([qid, [(h.chunk_id, round(h.score, 9)) for h in hits]]))
            scores = evaluate(Qrels(qrels), Run(run), ["ndcg@10", "recall@100"])
            report[name] = {**{k: round(float(v), 4) for k, v in scores.items()}, "rankings_sha256": digest.hexdigest()}
            print(name, report[name], flush=True)
    memo.save()
    return report


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=here.parent / "../shared/data/scifact")
    ap.add_argument("--embeddings", type=Path, default=here / "results/.cache/scifact")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if not (a.data / "corpus.jsonl").exists():
        sys.exit(f"no SciFact corpus at {a.data} (pass --data)")
    result = asyncio.run(main(a.data.resolve(), a.embeddings))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
