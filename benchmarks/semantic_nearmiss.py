"""SciFact near-miss pairs (cos ≥ τ, different evidence): semantic hits accepted with and without
guards and retrieval verification.

    python benchmarks/semantic_nearmiss.py [--data ../shared/data/scifact]
"""

import argparse
from pathlib import Path

from ragline.bench.nearmiss import run

if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=here.parent / "../shared/data/scifact")
    ap.add_argument("--out", type=Path, default=here / "results")
    ap.add_argument("--extra-docs", type=int, default=700)
    ap.add_argument("--tau", type=float, default=None, help="default: the configured semantic_threshold")
    a = ap.parse_args()
    run(a.data, a.out, a.extra_docs, tau=a.tau)
