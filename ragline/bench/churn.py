"""Churn benchmark: cache hit rate and staleness while the corpus changes (issue: tiered cache).

On BEIR SciFact: ingest 80% of the corpus, then alternate ingest batches (the
remaining 20%, ``batch`` documents at a time, plus updates and deletes of
existing documents) with a replay of the train+test queries drawn from a Zipf
distribution.  Every answer served from cache (exact or semantic) is checked
against a fresh, cache-bypassing run: its context chunk ids must be equal,
otherwise the hit was stale.

The same workload runs twice in one process on identical data: ragline's
precise, dependency-driven invalidation, and the baseline that flushes every
answer and retrieval entry on each change.  Embeddings are computed once and
shared by both runs (a memo in front of the model), so the comparison is about
the cache, not the model.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ragline.config import EmbedderSettings, Settings
from ragline.embed.base import Vectors
from ragline.embed.local import LocalEmbedder
from ragline.ingest.loaders import iter_documents
from ragline.pipeline import AsyncRAG
from ragline.types import Document


class MemoEmbedder:
    """The real model behind a text → vector memo, shared by both runs."""

    def __init__(self, inner: LocalEmbedder) -> None:
        self.inner = inner
        self.id = inner.id
        self.dim = inner.dim
        self.tokenizer_file = inner.tokenizer_file
        self.memo: dict[str, Vectors] = {}

    def embed(self, texts: list[str]) -> Vectors:
        todo = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if todo:
            for t, v in zip(todo, self.inner.embed(todo), strict=True):
                self.memo[t] = v
        return np.stack([self.memo[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)


def zipf_sequence(n_items: int, n: int, s: float, rng: random.Random) -> list[int]:
    weights = [1.0 / (i + 1) ** s for i in range(n_items)]
    return rng.choices(range(n_items), weights=weights, k=n)


def _mutate(doc: Document, round_no: int) -> Document:
    extra = f" Revision {round_no}: this abstract was updated with additional findings."
    return Document(doc.id, doc.text + extra, doc.title, doc.metadata, doc.source)


async def run_workload(settings: Settings, embedder: MemoEmbedder, base: list[Document],
                       rounds: list[dict[str, Any]], queries: list[str]) -> dict[str, Any]:
    hits = stale = served = order_only = 0
    semantic_hits = 0
    stale_examples: list[dict[str, Any]] = []
    ingest_s = query_s = 0.0
    async with AsyncRAG(settings, embedder=embedder) as rag:
        await rag.ingest(base)
        for rnd in rounds:
            t0 = time.perf_counter()
            await rag.ingest(rnd["ingest"])
            if rnd["delete"]:
                await rag.delete(rnd["delete"])
            ingest_s += time.perf_counter() - t0
            for q in rnd["queries"]:
                t0 = time.perf_counter()
                ans = await rag.ask(q)
                query_s += time.perf_counter() - t0
                served += 1
                if ans.cache.kind in ("exact", "semantic"):
                    hits += 1
                    semantic_hits += ans.cache.kind == "semantic"
                    fresh = await rag.ask(q, cache_mode="bypass")
                    # the evidence: chunk ids *and* texts, since an updated chunk keeps its id
                    if {(h.chunk_id, h.text) for h in fresh.sources} != {(h.chunk_id, h.text) for h in ans.sources}:
                        stale += 1
                        if len(stale_examples) < 5:
                            stale_examples.append({"query": q, "kind": ans.cache.kind,
                                                   "cached": [h.chunk_id for h in ans.sources],
                                                   "fresh": [h.chunk_id for h in fresh.sources]})
                    elif [h.chunk_id for h in fresh.sources] != [h.chunk_id for h in ans.sources]:
                        order_only += 1
        counters = dict(rag.cache.counters) if rag.cache is not None else {}
    return {"served": served, "hits": hits, "semantic_hits": semantic_hits, "hit_rate": round(hits / served, 4),
            "stale_hits": stale, "stale_examples": stale_examples,
            "hits_same_chunks_other_order": order_only, "ingest_s": round(ingest_s, 2),
            "query_s": round(query_s, 2), "cache_counters": counters}


def run(data: Path, out_dir: Path, docs_limit: int | None = None, batch: int = 50, queries_per_round: int = 100,
        updates: int = 5, deletes: int = 2, zipf_s: float = 1.1, seed: int = 7) -> dict[str, Any]:
    data = data.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    docs = list(iter_documents([data / "corpus.jsonl"], Settings().limits))
    rng.shuffle(docs)
    if docs_limit:
        docs = docs[:docs_limit]
    cut = int(len(docs) * 0.8)
    base, incoming = docs[:cut], docs[cut:]
    queries = [orjson.loads(line)["text"] for line in (data / "queries.jsonl").read_bytes().splitlines()]
    rng.shuffle(queries)  # which queries are "popular" is random, fixed by the seed
    rounds: list[dict[str, Any]] = []
    alive = [d.id for d in base]
    for r, i in enumerate(range(0, len(incoming), batch)):
        upd_ids = rng.sample(alive, min(updates, len(alive)))
        by_id = {d.id: d for d in base}
        upd = [_mutate(by_id[d], r) for d in upd_ids]
        dels = rng.sample([a for a in alive if a not in upd_ids], min(deletes, len(alive)))
        alive = [a for a in alive if a not in dels]
        qs = [queries[j] for j in zipf_sequence(len(queries), queries_per_round, zipf_s, rng)]
        rounds.append({"ingest": incoming[i:i + batch] + upd, "delete": dels, "queries": qs})
    print(f"corpus {len(docs)}: base {len(base)}, {len(rounds)} rounds of {batch} new + {updates} updated + "
          f"{deletes} deleted docs, {queries_per_round} Zipf(s={zipf_s}) queries per round", flush=True)
    embedder = MemoEmbedder(LocalEmbedder(EmbedderSettings()))
    report: dict[str, Any] = {"dataset": str(data), "documents": len(docs), "base": len(base),
                              "rounds": len(rounds), "batch": batch, "updates_per_round": updates,
                              "deletes_per_round": deletes, "queries_per_round": queries_per_round,
                              "zipf_s": zipf_s, "seed": seed}
    for name, mode in (("ragline", "precise"), ("flush_baseline", "flush")):
        with tempfile.TemporaryDirectory(prefix=f"ragline-churn-{name}-") as tmp:
            settings = Settings(data_dir=Path(tmp), cache={"enabled": True, "invalidation": mode})
            t0 = time.perf_counter()
            res = asyncio.run(run_workload(settings, embedder, base, rounds, queries))
            res["wall_s"] = round(time.perf_counter() - t0, 1)
            report[name] = res
            print(f"{name}: {res}", flush=True)
    rl, fb = report["ragline"], report["flush_baseline"]
    report["hit_rate_ratio_vs_flush"] = round(rl["hit_rate"] / fb["hit_rate"], 3) if fb["hit_rate"] else None
    report["checks"] = {"zero_stale_hits": rl["stale_hits"] == 0,
                        "hit_rate_at_least_1.5x_flush": (report["hit_rate_ratio_vs_flush"] or 0) >= 1.5}
    (out_dir / "churn.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    _plot(report, out_dir / "churn.png")
    print(f"\nhit rate: ragline {rl['hit_rate']:.3f} vs flush {fb['hit_rate']:.3f} "
          f"(x{report['hit_rate_ratio_vs_flush']}); stale hits: ragline {rl['stale_hits']}, "
          f"flush {fb['stale_hits']}\nchecks: {report['checks']}")
    return report


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["ragline", "flush_baseline"]
    fig, ax = plt.subplots(figsize=(6, 4))
    rates = [report[n]["hit_rate"] for n in names]
    ax.bar(names, rates, color=["tab:green", "tab:gray"])
    for i, n in enumerate(names):
        ax.text(i, rates[i] + 0.01, f"{rates[i]:.3f}\nstale {report[n]['stale_hits']}", ha="center")
    ax.set_ylim(0, 1)
    ax.set_ylabel("answer cache hit rate")
    ax.set_title(f"SciFact churn: {report['rounds']} ingest rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
