"""The exact-hit hot path: in-process hit vs miss, HTTP query-hit vs hello-world, cached vs uncached LLM.

    python benchmarks/hotpath.py [--data ../shared/data/scifact] [--out benchmarks/results] [--docs 300]
                                 [--workers 2] [--concurrency 16] [--rounds 3]

Same as ``ragline bench hotpath``; see ragline/bench/hotpath.py for what is measured.
Writes hotpath.json and hotpath.png to --out.
"""

import argparse
from pathlib import Path

from ragline.bench.hotpath import HotpathConfig, run

if __name__ == "__main__":
    d = HotpathConfig()
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / "../shared/data/scifact")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--docs", type=int, default=d.docs, help="SciFact documents to ingest")
    ap.add_argument("--hit-queries", type=int, default=d.hit_queries)
    ap.add_argument("--workers", type=int, default=d.workers, help="uvicorn workers of the server under test")
    ap.add_argument("--concurrency", type=int, default=d.concurrency, help="load generator connections")
    ap.add_argument("--rounds", type=int, default=d.rounds, help="interleaved healthz/query rounds")
    ap.add_argument("--requests", type=int, default=d.requests_per_run, help="requests per load run (upper bound)")
    ap.add_argument("--time-limit", type=float, default=d.run_time_limit_s, help="seconds per load run (upper bound)")
    ap.add_argument("--llm-queries", type=int, default=d.llm_queries)
    a = ap.parse_args()
    run(a.data, a.out, HotpathConfig(docs=a.docs, hit_queries=a.hit_queries, workers=a.workers,
                                     concurrency=a.concurrency, rounds=a.rounds, requests_per_run=a.requests,
                                     run_time_limit_s=a.time_limit, llm_queries=a.llm_queries))
