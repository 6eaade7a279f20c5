"""What the profiles (``profile: throughput | latency | memory``) change, measured on SciFact with the real
MiniLM embedder and the extractive LLM, in-process (library level; HTTP throughput is wrk's job elsewhere).

Each (round, profile) runs in a fresh subprocess, profiles interleaved and rotated per round, the default
settings (no profile) as the baseline of the same run:

* ingest of the first ``--docs`` SciFact documents (seconds);
* ``--queries`` distinct SciFact test queries asked one at a time, each a full miss (ms per query, median);
* the same queries again (exact hits, ms median);
* another ``--queries`` distinct queries through ``ask_many(max_concurrent=--concurrency)`` (queries/s);
* the process' peak RSS (MiB).

    python benchmarks/profiles.py --docs 200 --queries 30 --rounds 2 --out benchmarks/results/profiles.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import DATA, RESULTS, load_beir

PROFILES = ["default", "throughput", "latency", "memory"]


def child(profile: str, docs: int, queries: int, concurrency: int) -> dict[str, Any]:
    import asyncio

    import orjson

    from ragline import AsyncRAG, Settings
    from ragline.types import Document

    folder = DATA / "scifact"
    corpus = []
    with (folder / "corpus.jsonl").open() as f:
        for line in f:
            d = orjson.loads(line)
            corpus.append(Document(str(d["_id"]), d["text"], d.get("title") or None))
            if len(corpus) >= docs:
                break
    qs = list(load_beir(folder)[0].values())[: 2 * queries]
    seq, batch = qs[:queries], qs[queries:]

    async def run(tmp: str) -> dict[str, Any]:
        s = Settings(data_dir=Path(tmp), profile=None if profile == "default" else profile, cache={"redis_url": None})
        async with AsyncRAG(s) as rag:
            t0 = time.perf_counter()
            await rag.ingest(corpus)
            ingest_s = time.perf_counter() - t0
            miss, hit = [], []
            for q in seq:
                t = time.perf_counter()
                await rag.ask(q)
                miss.append(time.perf_counter() - t)
            for q in seq:
                t = time.perf_counter()
                await rag.ask(q)
                hit.append(time.perf_counter() - t)
            t = time.perf_counter()
            await rag.ask_many(batch, max_concurrent=concurrency)
            qps = len(batch) / (time.perf_counter() - t)
        return {
            "ingest_s": round(ingest_s, 3),
            "miss_ms": round(statistics.median(miss) * 1000, 2),
            "hit_ms": round(statistics.median(hit) * 1000, 3),
            "batch_qps": round(qps, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }

    with tempfile.TemporaryDirectory(prefix="ragline-profiles-") as tmp:
        return asyncio.run(run(tmp))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "profiles.json")
    ap.add_argument("--child", choices=PROFILES, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.docs, a.queries, a.concurrency)))
        return
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in PROFILES}
    for r in range(a.rounds):
        order = PROFILES[r % len(PROFILES) :] + PROFILES[: r % len(PROFILES)]  # rotated: no profile always first
        for p in order:
            cmd = [sys.executable, __file__, "--child", p, "--docs", str(a.docs), "--queries", str(a.queries),
                   "--concurrency", str(a.concurrency)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            runs[p].append(json.loads(out))
            print(f"round {r} {p:10s} {runs[p][-1]}", flush=True)
    metrics = list(runs["default"][0])
    summary = {p: {m: statistics.median(x[m] for x in runs[p]) for m in metrics} for p in PROFILES}
    ratios = {p: {m: round(summary[p][m] / summary["default"][m], 3) for m in metrics} for p in PROFILES}
    result = {"args": {k: str(v) for k, v in vars(a).items()}, "runs": runs, "median": summary, "vs_default": ratios}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    for p in PROFILES:
        print(p, summary[p], ratios[p])


if __name__ == "__main__":
    main()
