"""Cache hit rate and stale hits under corpus churn, against a flush-on-ingest baseline.

    python benchmarks/churn.py [--data ../shared/data/scifact] [--docs N] [--batch 50]
                               [--queries-per-round 100,50,200] [--embeddings PATH]

Same as ``ragline bench churn``; see ragline/bench/churn.py.
"""

import argparse
from pathlib import Path

from ragline.bench.churn import run

if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=here.parent / "../shared/data/scifact")
    ap.add_argument("--out", type=Path, default=here / "results")
    ap.add_argument("--docs", type=int, default=None, help="use only N corpus documents (default: all)")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--queries-per-round", default="100,50,200",
                    help="comma-separated sweep; the first is the headline the checks apply to")
    ap.add_argument("--embeddings", type=Path, default=None,
                    help="save/load the chunk embeddings here (e.g. benchmarks/results/.cache/scifact)")
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    run(a.data, a.out, a.docs, a.batch, [int(x) for x in a.queries_per_round.split(",")], seed=a.seed,
        embeddings=a.embeddings)
