"""Churn benchmark: cache hit rate and staleness while the corpus changes (issue: tiered cache).

    python benchmarks/churn.py [--data ../shared/data/scifact] [--docs N] [--batch 50]
                               [--queries-per-round 100,50,200] [--embeddings PATH] [--seed 7]

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

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from _common import DATA, RESULTS

from ragline.config import EmbedderSettings, Settings
from ragline.embed.local import LocalEmbedder
from ragline.ingest.loaders import iter_documents
from ragline.pipeline import AsyncRAG
from ragline.types import Document, Vectors


class MemoEmbedder:
    """The real model behind a text → vector memo, shared by every run (optionally saved to disk)."""

    def __init__(self, inner: LocalEmbedder, path: Path | None = None) -> None:
        self.inner = inner
        self.id = inner.id
        self.dim = inner.dim
        self.tokenizer_file = inner.tokenizer_file
        self.memo: dict[str, Vectors] = {}
        self.path = path
        if path is not None and path.with_suffix(".json").exists():
            texts = orjson.loads(path.with_suffix(".json").read_bytes())
            self.memo = dict(zip(texts, np.load(path.with_suffix(".npy")), strict=True))

    def embed(self, texts: list[str]) -> Vectors:
        todo = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if todo:
            for t, v in zip(todo, self.inner.embed(todo), strict=True):
                self.memo[t] = v
        return np.stack([self.memo[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)

    def save(self) -> None:
        if self.path is not None and self.memo:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            np.save(self.path.with_suffix(".npy"), np.stack(list(self.memo.values())))
            self.path.with_suffix(".json").write_bytes(orjson.dumps(list(self.memo)))


def zipf_sequence(n_items: int, n: int, s: float, rng: random.Random) -> list[int]:
    weights = [1.0 / (i + 1) ** s for i in range(n_items)]
    return rng.choices(range(n_items), weights=weights, k=n)


def _mutate(doc: Document, round_no: int) -> Document:
    extra = f" Revision {round_no}: this abstract was updated with additional findings."
    return Document(doc.id, doc.text + extra, doc.title, doc.metadata, doc.source)


async def run_workload(
    settings: Settings, embedder: MemoEmbedder, base: list[Document], rounds: list[dict[str, Any]], queries: list[str]
) -> dict[str, Any]:
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
                            stale_examples.append(
                                {
                                    "query": q,
                                    "kind": ans.cache.kind,
                                    "cached": [h.chunk_id for h in ans.sources],
                                    "fresh": [h.chunk_id for h in fresh.sources],
                                }
                            )
                    elif [h.chunk_id for h in fresh.sources] != [h.chunk_id for h in ans.sources]:
                        order_only += 1
        counters = dict(rag.cache.counters) if rag.cache is not None else {}
    return {
        "served": served,
        "hits": hits,
        "semantic_hits": semantic_hits,
        "hit_rate": round(hits / served, 4),
        "stale_hits": stale,
        "stale_examples": stale_examples,
        "hits_same_chunks_other_order": order_only,
        "ingest_s": round(ingest_s, 2),
        "query_s": round(query_s, 2),
        "cache_counters": counters,
    }


def _schedule(
    docs: list[Document], batch: int, updates: int, deletes: int, rng: random.Random
) -> tuple[list[Document], list[dict[str, Any]]]:
    """The base 80% and the rounds of corpus changes (new batch + updates + deletes)."""
    cut = int(len(docs) * 0.8)
    base, incoming = docs[:cut], docs[cut:]
    by_id = {d.id: d for d in base}
    alive = [d.id for d in base]
    rounds: list[dict[str, Any]] = []
    for r, i in enumerate(range(0, len(incoming), batch)):
        upd_ids = rng.sample(alive, min(updates, len(alive)))
        upd = [_mutate(by_id[d], r) for d in upd_ids]
        dels = rng.sample([a for a in alive if a not in upd_ids], min(deletes, len(alive)))
        alive = [a for a in alive if a not in dels]
        rounds.append({"ingest": incoming[i : i + batch] + upd, "delete": dels})
    return base, rounds


def ceiling(rounds: list[dict[str, Any]]) -> float:
    """Hit rate of a cache that never invalidates (and so may serve stale answers): an upper bound."""
    seq = [q for r in rounds for q in r["queries"]]
    return round(1 - len(set(seq)) / len(seq), 4) if seq else 0.0


def run(
    data: Path,
    out_dir: Path,
    docs_limit: int | None = None,
    batch: int = 50,
    queries_per_round: int | list[int] = 100,
    updates: int = 5,
    deletes: int = 2,
    zipf_s: float = 1.1,
    seed: int = 7,
    embeddings: Path | None = None,
) -> dict[str, Any]:
    """Run the workload at each ``queries_per_round`` (the first is the headline); write JSON + PNG.

    Before the timed runs every text the workload will embed goes through the
    model once (an ingest into a throwaway store), so ragline and the baseline
    both ingest from the memo and ``ingest_s`` compares cache work, not model
    work.  ``embeddings`` saves the memo for later runs.
    """
    data = data.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    sweep = [queries_per_round] if isinstance(queries_per_round, int) else list(queries_per_round)
    if not sweep or min(sweep) < 1 or batch < 1:
        raise ValueError(f"queries per round must be ≥ 1 (got {sweep}) and batch ≥ 1 (got {batch})")
    rng = random.Random(seed)
    docs = list(iter_documents([data / "corpus.jsonl"], Settings().limits))
    rng.shuffle(docs)
    if docs_limit:
        docs = docs[:docs_limit]
    base, changes = _schedule(docs, batch, updates, deletes, rng)
    queries = [orjson.loads(line)["text"] for line in (data / "queries.jsonl").read_bytes().splitlines()]
    rng.shuffle(queries)  # which queries are "popular" is random, fixed by the seed
    print(
        f"corpus {len(docs)}: base {len(base)}, {len(changes)} rounds of {batch} new + {updates} updated + "
        f"{deletes} deleted docs; Zipf(s={zipf_s}) queries per round: {sweep}",
        flush=True,
    )
    embedder = MemoEmbedder(LocalEmbedder(EmbedderSettings()), embeddings)
    t0 = time.perf_counter()
    asyncio.run(_warm(embedder, base, changes))
    embedder.save()
    report: dict[str, Any] = {
        "dataset": str(data),
        "documents": len(docs),
        "base": len(base),
        "rounds": len(changes),
        "batch": batch,
        "updates_per_round": updates,
        "deletes_per_round": deletes,
        "zipf_s": zipf_s,
        "seed": seed,
        "warmup_embedding_s": round(time.perf_counter() - t0, 1),
        "stale_rule": "a hit is stale when its sources differ from a cache-bypassing run's "
        "as a set of (chunk id, chunk text)",
        "workloads": [],
    }
    for qpr in sweep:
        qrng = random.Random(seed * 1000 + qpr)
        rounds = [
            {**c, "queries": [queries[j] for j in zipf_sequence(len(queries), qpr, zipf_s, qrng)]} for c in changes
        ]
        w: dict[str, Any] = {"queries_per_round": qpr, "never_invalidate_ceiling": ceiling(rounds)}
        for name, mode in (("ragline", "precise"), ("flush_baseline", "flush")):
            with tempfile.TemporaryDirectory(prefix=f"ragline-churn-{name}-") as tmp:
                settings = Settings(data_dir=Path(tmp), cache={"enabled": True, "invalidation": mode})
                t1 = time.perf_counter()
                res = asyncio.run(run_workload(settings, embedder, base, rounds, queries))
                res["wall_s"] = round(time.perf_counter() - t1, 1)
                w[name] = res
                print(f"{qpr} q/round, {name}: {res}", flush=True)
        rl, fb = w["ragline"]["hit_rate"], w["flush_baseline"]["hit_rate"]
        w["hit_rate_ratio_vs_flush"] = round(rl / fb, 3) if fb else None
        gain = w["never_invalidate_ceiling"] - fb
        w["share_of_possible_gain"] = round((rl - fb) / gain, 3) if gain > 0 else None
        report["workloads"].append(w)
        print(
            f"{qpr} q/round: hit rate ragline {rl:.3f} vs flush {fb:.3f} (x{w['hit_rate_ratio_vs_flush']}), "
            f"ceiling {w['never_invalidate_ceiling']:.3f}; stale: ragline {w['ragline']['stale_hits']}, "
            f"flush {w['flush_baseline']['stale_hits']}",
            flush=True,
        )
    head = report["workloads"][0]
    report["checks"] = {
        "zero_stale_hits": all(w["ragline"]["stale_hits"] == 0 for w in report["workloads"]),
        "hit_rate_at_least_1.5x_flush": (head["hit_rate_ratio_vs_flush"] or 0) >= 1.5,
    }
    (out_dir / "churn.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    _plot(report, out_dir / "churn.png")
    print(f"checks ({head['queries_per_round']} q/round): {report['checks']}")
    return report


async def _warm(embedder: MemoEmbedder, base: list[Document], changes: list[dict[str, Any]]) -> None:
    """Embed every chunk text the workload will ingest, through the real pipeline's chunker."""
    with tempfile.TemporaryDirectory(prefix="ragline-churn-warm-") as tmp:
        async with AsyncRAG(Settings(data_dir=Path(tmp), cache={"enabled": False}), embedder=embedder) as rag:
            await rag.ingest(base)
            for c in changes:
                await rag.ingest(c["ingest"])


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = report["workloads"]
    x = np.arange(len(ws))
    fig, ax = plt.subplots(figsize=(7, 4))
    series = [("flush_baseline", "flush on ingest", "tab:gray"), ("ragline", "ragline", "tab:green")]
    for j, (name, label, color) in enumerate(series):
        rates = [w[name]["hit_rate"] for w in ws]
        ax.bar(x + (j - 0.5) * 0.38, rates, 0.38, label=label, color=color)
        for i, w in enumerate(ws):
            ax.text(
                x[i] + (j - 0.5) * 0.38,
                rates[i] + 0.01,
                f"{rates[i]:.3f}\nstale {w[name]['stale_hits']}",
                ha="center",
                fontsize=8,
            )
    ax.scatter(
        x,
        [w["never_invalidate_ceiling"] for w in ws],
        marker="_",
        s=900,
        color="black",
        label="never-invalidate ceiling",
        zorder=3,
    )
    ax.set_xticks(x, [f"{w['queries_per_round']} queries/round\nx{w['hit_rate_ratio_vs_flush']}" for w in ws])
    ax.set_ylim(0, 1)
    ax.set_ylabel("answer cache hit rate")
    ax.set_title(f"SciFact churn: {report['rounds']} ingest rounds of {report['batch']} new docs")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Cache hit rate and stale hits under corpus churn vs flush-on-ingest.")
    ap.add_argument("--data", type=Path, default=DATA / "scifact")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--docs", type=int, default=None, help="use only N corpus documents (default: all)")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument(
        "--queries-per-round",
        default="100,50,200",
        help="comma-separated sweep; the first is the headline the checks apply to",
    )
    ap.add_argument(
        "--embeddings",
        type=Path,
        default=None,
        help="save/load the chunk embeddings here (e.g. benchmarks/results/.cache/scifact)",
    )
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args(argv)
    try:
        sweep = [int(x) for x in a.queries_per_round.split(",")]
    except ValueError:
        ap.error(f"--queries-per-round must be comma-separated integers, got {a.queries_per_round!r}")
    if min(sweep) < 1 or a.batch < 1:
        ap.error("--queries-per-round values and --batch must be >= 1")
    run(a.data, a.out, a.docs, a.batch, sweep, seed=a.seed, embeddings=a.embeddings)


if __name__ == "__main__":
    main()
