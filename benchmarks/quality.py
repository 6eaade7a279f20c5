"""Retrieval quality + ingest/search speed on BEIR SciFact.

    python benchmarks/quality.py [--data ../shared/data/scifact] [--out benchmarks/results] [--limit N]

Same as ``ragline bench quality``; see ragline/bench/quality.py for what is measured.
"""

import argparse
from pathlib import Path

from ragline.bench.quality import run

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / "../shared/data/scifact")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--limit", type=int, default=None, help="only N corpus documents (relevant ones kept)")
    ap.add_argument("--no-http", action="store_true")
    a = ap.parse_args()
    run(a.data, a.out, a.limit, http=not a.no_http)
