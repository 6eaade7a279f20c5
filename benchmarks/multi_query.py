"""Multi-query retrieval on a BEIR dataset (default: ../shared/data/scifact): quality and latency, with and without.

    python benchmarks/multi_query.py [--data ../shared/data/scifact] [--out benchmarks/results] [--limit N] [--n 3]

One run, one index (the corpus is embedded once with the real MiniLM model), the same queries:

* nDCG@10 and Recall@100 at document level (ranx, BEIR definitions) for hybrid retrieval and hybrid + MMR,
  each without and with ``retrieval.multi_query`` (``--n`` variations per query);
* latency p50/p99 of one search as the pipeline runs it: the query embedding (and, with multi-query, the
  variations' embeddings) plus retrieval, off and on alternating query by query (interleaved rounds, so
  both see the same machine load), and their ratio.

The variations are the **cheap rewrites** of :func:`ragline.multiquery.cheap_variants` (content words,
keywords, longest content-word run): no LLM runs here.  Writes ``multi_query.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from _common import DATA, RESULTS, load_beir, percentiles

from ragline.config import Settings
from ragline.ingest.loaders import iter_documents
from ragline.multiquery import MultiQuery, cheap_variants
from ragline.pipeline import AsyncRAG
from ragline.retrieve import HybridRetriever
from ragline.types import DEFAULT_TENANT, Document


async def _measure(rag: AsyncRAG, queries: dict[str, str], qrels: dict[str, dict[str, int]], n: int) -> dict[str, Any]:
    from ranx import Qrels, Run, evaluate

    base = rag.settings.retrieval
    mq = MultiQuery(n, lambda tenant, text: rag.embed_query(text, tenant))
    off = HybridRetriever(rag.store, base)
    on = HybridRetriever(rag.store, base.model_copy(update={"multi_query": True, "multi_query_n": n}), mq)
    depth = max(base.candidates, 300)
    qids = list(queries)
    quality: dict[str, dict[str, float]] = {}
    for use_mmr in (False, True):
        for label, retr in (("off", off), ("on", on)):
            run: dict[str, dict[str, float]] = {}
            for qid in qids:
                qv = await rag.embed_query(queries[qid])
                r = await retr.retrieve(DEFAULT_TENANT, queries[qid], qv, 100, use_mmr, True, depth)
                run[qid] = {h.doc_id: float(100 - i) for i, h in enumerate(r.hits)} or {"__none__": 0.0}
            scores = evaluate(Qrels(qrels), Run(run), ["ndcg@10", "recall@100"])
            name = f"hybrid{'_mmr' if use_mmr else ''}_{label}"
            quality[name] = {k: round(float(v), 4) for k, v in scores.items()}
            print(f"  {name}: {quality[name]}", flush=True)

    async def once(retr: HybridRetriever, text: str) -> float:
        t0 = time.perf_counter()
        qv = await rag.embed_query(text)
        await retr.retrieve(DEFAULT_TENANT, text, qv, 10, False)
        return time.perf_counter() - t0

    for qid in qids[:20]:  # warm-up
        await once(off, queries[qid])
        await once(on, queries[qid])
    lat: dict[str, list[float]] = {"off": [], "on": []}
    for i, qid in enumerate(qids):  # interleaved: alternate which goes first
        order = (("off", off), ("on", on)) if i % 2 == 0 else (("on", on), ("off", off))
        for label, retr in order:
            lat[label].append(await once(retr, queries[qid]))
    variants = [len(cheap_variants(queries[q], n)) for q in qids]
    return {
        "quality": quality,
        "ndcg10_delta": {
            "hybrid": round(quality["hybrid_on"]["ndcg@10"] - quality["hybrid_off"]["ndcg@10"], 4),
            "hybrid_mmr": round(quality["hybrid_mmr_on"]["ndcg@10"] - quality["hybrid_mmr_off"]["ndcg@10"], 4),
        },
        "latency": {"off": percentiles(lat["off"]), "on": percentiles(lat["on"])},
        "latency_p50_ratio_on_off": round(statistics.median(lat["on"]) / statistics.median(lat["off"]), 3),
        "variations_per_query_mean": round(sum(variants) / len(variants), 3),
    }


def run(data: Path, out_dir: Path, limit: int | None, n: int) -> dict[str, Any]:
    data = data.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    queries, qrels = load_beir(data)
    docs: list[Document] = list(iter_documents([data / "corpus.jsonl"], Settings().limits))
    if limit:
        keep = {d for rel in qrels.values() for d in rel}
        docs = [d for d in docs if d.id in keep] + [d for d in docs if d.id not in keep][: max(0, limit - len(keep))]
    print(f"corpus: {len(docs)} documents, {len(queries)} test queries, {n} variations", flush=True)
    with tempfile.TemporaryDirectory(prefix="ragline-mq-") as tmp:
        settings = Settings(data_dir=Path(tmp) / "data", cache={"enabled": False})

        async def main() -> dict[str, Any]:
            async with AsyncRAG(settings) as rag:
                t0 = time.perf_counter()
                rep = await rag.ingest(docs)
                print(f"ingested {rep.chunks_added} chunks in {time.perf_counter() - t0:.0f} s", flush=True)
                return await _measure(rag, queries, qrels, n)

        result = asyncio.run(main())
    report: dict[str, Any] = {
        "dataset": str(data),
        "documents": len(docs),
        "queries": len(queries),
        "variations": "cheap rewrites (ragline.multiquery.cheap_variants); no LLM",
        "multi_query_n": n,
        **result,
    }
    d = report["ndcg10_delta"]
    report["checks"] = {
        "multi_query_helps_hybrid": d["hybrid"] > 0,
        "multi_query_helps_hybrid_mmr": d["hybrid_mmr"] > 0,
    }
    (out_dir / "multi_query.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(
        orjson.dumps(
            {k: report[k] for k in ("quality", "ndcg10_delta", "latency", "checks")}, option=orjson.OPT_INDENT_2
        ).decode()
    )
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Multi-query retrieval on BEIR SciFact: nDCG@10 and latency, off vs on.")
    ap.add_argument("--data", type=Path, default=DATA / "scifact")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--limit", type=int, default=None, help="only N corpus documents (relevant ones kept)")
    ap.add_argument("--n", type=int, default=3, help="variations per query (cheap rewrites give at most 3)")
    a = ap.parse_args(argv)
    run(a.data, a.out, a.limit, a.n)


if __name__ == "__main__":
    main()
