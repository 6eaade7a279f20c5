"""Retrieval quality and speed on a BEIR dataset (default: ../shared/data/scifact).

    python benchmarks/quality.py [--data ../shared/data/scifact] [--out benchmarks/results] [--limit N] [--no-http]
                                 [--store embedded|postgres]

One run measures, on the same machine and corpus:

* nDCG@10 and Recall@100 at document level for BM25 alone, dense alone,
  hybrid (RRF k=60) and hybrid + MMR, with ranx (standard BEIR definitions);
* raw embedding throughput of the model over every chunk (the limit) and the
  pipeline's ingest throughput over the same chunks, and their ratio;
* search latency p50/p99: in-process hybrid search without the query
  embedding, the query embedding alone, and ``POST /v1/search`` over HTTP
  against a ``ragline serve`` subprocess on 127.0.0.1.

With ``--store postgres`` the same run then copies the embedded store (chunks and vectors, no
re-embedding) into a PostgreSQL 16 + pgvector started with ``pgserver`` in a temporary folder, and
measures the same quality and latency figures on it, side by side (``quality_postgres.json``).

Writes ``quality.json`` and ``quality.png`` to the output folder.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from _common import DATA, RESULTS, free_port, load_beir, percentiles

from ragline.config import RetrievalSettings, Settings
from ragline.ingest.loaders import iter_documents
from ragline.pipeline import AsyncRAG
from ragline.retrieve import HybridRetriever
from ragline.types import DEFAULT_TENANT, Document


async def _evaluate(
    rag: AsyncRAG, queries: dict[str, str], qrels: dict[str, dict[str, int]], depth: int
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    from ranx import Qrels, Run, evaluate

    qids = list(queries)
    qvecs = rag.embedder.embed([queries[q] for q in qids])
    base = rag.settings.retrieval
    modes = {
        "bm25": (RetrievalSettings(**{**base.model_dump(), "dense": False}), False),
        "dense": (RetrievalSettings(**{**base.model_dump(), "keyword": False}), False),
        "hybrid": (base, False),
        "hybrid_mmr": (base, True),
    }
    results: dict[str, dict[str, float]] = {}
    for name, (rs, use_mmr) in modes.items():
        retr = HybridRetriever(rag.store, rs)
        run: dict[str, dict[str, float]] = {}
        for qid, qv in zip(qids, qvecs, strict=True):
            r = await retr.retrieve(
                DEFAULT_TENANT, queries[qid], qv, 100, use_mmr=use_mmr, doc_level=True, candidates=depth
            )
            run[qid] = {h.doc_id: float(100 - i) for i, h in enumerate(r.hits)}
            if not run[qid]:
                run[qid] = {"__none__": 0.0}
        scores = evaluate(Qrels(qrels), Run(run), ["ndcg@10", "recall@100"])
        results[name] = {k: round(float(v), 4) for k, v in scores.items()}
    # latency: hybrid search without the query embedding, then the embedding alone
    retr = HybridRetriever(rag.store, base)
    lat_search, lat_embed = [], []
    for qid, qv in zip(qids, qvecs, strict=True):
        t0 = time.perf_counter()
        await retr.retrieve(DEFAULT_TENANT, queries[qid], qv, 10, use_mmr=False)
        lat_search.append(time.perf_counter() - t0)
    for qid in qids:
        t0 = time.perf_counter()
        rag.embedder.embed([queries[qid]])
        lat_embed.append(time.perf_counter() - t0)
    return results, {"hybrid_search_in_process": percentiles(lat_search), "query_embedding": percentiles(lat_embed)}


def _http_latency(data_dir: Path, queries: list[str], env_extra: dict[str, str] | None = None) -> dict[str, float]:
    import httpx

    port = free_port()
    env = {**os.environ, "RAGLINE_DATA_DIR": str(data_dir), "RAGLINE_CACHE__ENABLED": "false", **(env_extra or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ragline.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        with httpx.Client(base_url=url, timeout=30) as c:
            while True:
                try:
                    if c.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("server did not become ready")
                time.sleep(0.5)
            for q in queries[:20]:  # warm-up
                c.post("/v1/search", json={"query": q, "k": 10})
            lat = []
            for q in queries:
                t0 = time.perf_counter()
                r = c.post("/v1/search", json={"query": q, "k": 10})
                lat.append(time.perf_counter() - t0)
                r.raise_for_status()
        return percentiles(lat)
    finally:
        proc.terminate()
        proc.wait(30)


def run(
    data: Path, out_dir: Path, limit: int | None = None, http: bool = True, store: str = "embedded"
) -> dict[str, Any]:
    data = data.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    queries, qrels = load_beir(data)
    docs: list[Document] = list(iter_documents([data / "corpus.jsonl"], Settings().limits))
    if limit:
        keep = {d for rel in qrels.values() for d in rel}
        docs = [d for d in docs if d.id in keep] + [d for d in docs if d.id not in keep][: max(0, limit - len(keep))]
    print(f"corpus: {len(docs)} documents, {len(queries)} test queries", flush=True)
    with tempfile.TemporaryDirectory(prefix="ragline-bench-") as tmp:
        settings = Settings(data_dir=Path(tmp) / "data", cache={"enabled": False})
        report: dict[str, Any] = {
            "dataset": str(data),
            "documents": len(docs),
            "queries": len(queries),
            "settings": {"chunk": settings.chunk.model_dump(), "retrieval": settings.retrieval.model_dump()},
        }

        async def main() -> None:
            async with AsyncRAG(settings) as rag:
                # Interleave the baseline and the pipeline group by group, so both see the same
                # machine load: raw model throughput on a group's chunks, then ingest of that group.
                raw_s = ingest_s = 0.0
                n_texts = 0
                embedded = added = 0
                group = 400
                for g in range(0, len(docs), group):
                    part = docs[g : g + group]
                    chunks = [c for cs in rag.chunker.chunk_many(part) for c in cs]
                    texts = list({c.content_hash: c.index_text for c in chunks}.values())
                    t0 = time.perf_counter()
                    for i in range(0, len(texts), 256):
                        rag.embedder.embed(texts[i : i + 256])
                    raw_s += time.perf_counter() - t0
                    n_texts += len(texts)
                    t0 = time.perf_counter()
                    rep = await rag.ingest(part)
                    ingest_s += time.perf_counter() - t0
                    embedded += rep.chunks_embedded
                    added += rep.chunks_added
                    print(
                        f"  {g + len(part)}/{len(docs)} docs: raw {n_texts / raw_s:.1f} chunks/s, "
                        f"ingest {embedded / ingest_s:.1f} chunks/s",
                        flush=True,
                    )
                raw_rate = n_texts / raw_s
                ingest_rate = embedded / ingest_s
                report["ingest"] = {
                    "chunks": added,
                    "chunks_embedded": embedded,
                    "raw_embedding_chunks_per_s": round(raw_rate, 2),
                    "ingest_chunks_per_s": round(ingest_rate, 2),
                    "ratio_to_raw": round(ingest_rate / raw_rate, 3),
                    "raw_s": round(raw_s, 2),
                    "ingest_s": round(ingest_s, 2),
                }
                print(f"ingest: {report['ingest']}", flush=True)
                depth = max(settings.retrieval.candidates, 300)
                quality, latency = await _evaluate(rag, queries, qrels, depth)
                report["quality"] = quality
                report["latency"] = latency
                if store == "postgres":
                    report["postgres"] = await _postgres(rag, queries, qrels, depth, Path(tmp), http)

        asyncio.run(main())
        if http:
            report["latency"]["http_search"] = _http_latency(settings.data_dir, list(queries.values()))
    q = report["quality"]
    if "postgres" in report:
        pq = report["postgres"]["quality"]
        report["postgres"]["ndcg10_minus_embedded"] = {
            m: round(pq[m]["ndcg@10"] - q[m]["ndcg@10"], 4) for m in ("bm25", "dense", "hybrid", "hybrid_mmr")
        }
        report["checks_postgres"] = {
            f"{m}_ndcg10_within_0.01": abs(d) <= 0.01
            for m, d in report["postgres"]["ndcg10_minus_embedded"].items()
            if m != "hybrid_mmr"
        }
    report["checks"] = {
        "hybrid_beats_bm25": q["hybrid"]["ndcg@10"] > q["bm25"]["ndcg@10"],
        "hybrid_beats_dense": q["hybrid"]["ndcg@10"] > q["dense"]["ndcg@10"],
        "hybrid_ndcg10_at_least_0.69": q["hybrid"]["ndcg@10"] >= 0.69,
        "ingest_ratio_at_least_0.85": report["ingest"]["ratio_to_raw"] >= 0.85,
    }
    name = "quality_postgres" if store == "postgres" else "quality"
    (out_dir / f"{name}.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    _plot(report, out_dir / f"{name}.png")
    _print(report)
    return report


async def _postgres(
    rag: AsyncRAG, queries: dict[str, str], qrels: dict[str, dict[str, int]], depth: int, tmp: Path, http: bool
) -> dict[str, Any]:
    """The same corpus in PostgreSQL (copied, not re-embedded), measured the same way."""
    import pgserver

    from ragline.store.embedded import EmbeddedStore
    from ragline.store.migrate import copy_store
    from ragline.store.postgres import PostgresStore

    srv = pgserver.get_server(tmp / "pg", cleanup_mode="stop")
    try:
        dsn = srv.get_uri()
        pg = PostgresStore(dsn, rag.embedder.dim)
        src = rag.store
        assert isinstance(src, EmbeddedStore)
        t0 = time.perf_counter()
        copied = await asyncio.to_thread(copy_store, src, pg)
        copy_s = time.perf_counter() - t0
        print(f"postgres: copied {copied} in {copy_s:.1f} s", flush=True)
        settings = Settings(data_dir=tmp / "pgdata", store="postgres", postgres_dsn=dsn, cache={"enabled": False})
        async with AsyncRAG(settings, embedder=rag.embedder, store=pg) as prag:
            quality, latency = await _evaluate(prag, queries, qrels, depth)
        out: dict[str, Any] = {"copy_s": round(copy_s, 1), "quality": quality, "latency": latency}
        if http:
            env = {"RAGLINE_STORE": "postgres", "RAGLINE_POSTGRES_DSN": dsn}
            out["latency"]["http_search"] = _http_latency(tmp / "pgdata", list(queries.values()), env)
        return out
    finally:
        srv.cleanup()


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = report["quality"]
    modes = list(q)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(modes))
    a1.bar(x - 0.2, [q[m]["ndcg@10"] for m in modes], 0.4, label="nDCG@10")
    a1.bar(x + 0.2, [q[m]["recall@100"] for m in modes], 0.4, label="Recall@100")
    a1.set_xticks(x, modes)
    a1.set_ylim(0, 1)
    a1.set_title(f"SciFact test ({report['queries']} queries)")
    a1.legend(loc="lower right")
    lat = report["latency"]
    names = list(lat)
    a2.bar(np.arange(len(names)) - 0.2, [lat[n]["p50_ms"] for n in names], 0.4, label="p50")
    a2.bar(np.arange(len(names)) + 0.2, [lat[n]["p99_ms"] for n in names], 0.4, label="p99")
    a2.set_xticks(np.arange(len(names)), [n.replace("_", "\n") for n in names], fontsize=8)
    a2.set_ylabel("ms")
    a2.set_title("search latency")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print(report: dict[str, Any]) -> None:
    print(f"\n{'mode':<12}{'nDCG@10':>10}{'R@100':>10}")
    for m, v in report["quality"].items():
        print(f"{m:<12}{v['ndcg@10']:>10.4f}{v['recall@100']:>10.4f}")
    print("\ningest:", report["ingest"])
    for n, v in report["latency"].items():
        print(f"{n:<28} p50 {v['p50_ms']:.2f} ms  p99 {v['p99_ms']:.2f} ms")
    print("checks:", report["checks"])
    if "postgres" in report:
        pg = report["postgres"]
        print("\npostgres (same corpus, same run):")
        for m, v in pg["quality"].items():
            print(f"{m:<12}{v['ndcg@10']:>10.4f}{v['recall@100']:>10.4f}  ({pg['ndcg10_minus_embedded'][m]:+.4f})")
        for n, v in pg["latency"].items():
            print(f"{n:<28} p50 {v['p50_ms']:.2f} ms  p99 {v['p99_ms']:.2f} ms")
        print("checks:", report["checks_postgres"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Retrieval quality + ingest/search speed on BEIR SciFact.")
    ap.add_argument("--data", type=Path, default=DATA / "scifact")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--limit", type=int, default=None, help="only N corpus documents (relevant ones kept)")
    ap.add_argument("--no-http", action="store_true")
    ap.add_argument("--store", choices=["embedded", "postgres"], default="embedded",
                    help="postgres: also measure the PostgreSQL store on the same corpus, same run")  # fmt: skip
    a = ap.parse_args(argv)
    run(a.data, a.out, a.limit, http=not a.no_http, store=a.store)


if __name__ == "__main__":
    main()
