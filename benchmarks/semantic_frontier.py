"""How far can any accept rule over ragline's signals go on held-out Quora pairs?  (issue 12's target)

    python benchmarks/semantic_frontier.py [--data ../shared/data]

The target of the semantic cache is a precision whose 95% Wilson lower bound is at least 0.93 at a
recall of at least 0.30 on Quora-style pairs the decision was not fitted on.  This script asks
whether that target is reachable at all with the MiniLM vectors and the signals ragline computes,
by giving the question to models far more flexible than the shipped rule:

* ``cosine``: the MiniLM cosine alone;
* ``logistic``: the shipped signal set in an L2 logistic regression (as ``semantic_fit.py``);
* ``boosted``: gradient-boosted trees (scikit-learn ``HistGradientBoostingClassifier``) over the
  signals, and over the signals plus the vectors' interaction features ``u ⊙ v, |u − v|``.

Each is fitted on the QQP **fit** split (plus STS-B train); its threshold for precision 0.95 is chosen
on **val**, and the figures are on **test** (``benchmarks/_pairs.py``: splits by connected component, no
question shared).  It also reports an *upper bound* per model: the best precision at recall ≥ 0.30 with
the threshold chosen on test itself, which no honest rule can beat.  If that bound is below 0.95 the
target is out of reach of these signals, whatever the rule.

Writes ``results/semantic_frontier.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from _common import DATA, RESULTS, write_report
from semantic_accuracy import wilson
from semantic_fit import fit_logistic, load_pair_data, predict

Arr = npt.NDArray[np.float64]
TARGET_PRECISION = 0.95
TARGET_RECALL = 0.30


def _at_threshold(p: Arr, y: Arr, t: float) -> dict[str, Any]:
    acc = p >= t
    tp, n, pos = int((acc & (y == 1)).sum()), int(acc.sum()), int(y.sum())
    lo, hi = wilson(tp, n)
    return {
        "threshold": round(float(t), 4),
        "accepted": n,
        "precision": round(tp / n, 4) if n else None,
        "wilson95": [round(lo, 4), round(hi, 4)],
        "recall": round(tp / pos, 4),
    }


def _choose(p: Arr, y: Arr, target: float, min_accepted: int = 50) -> float:
    """The lowest score threshold whose precision on (p, y) meets ``target`` with ≥ min_accepted."""
    order = np.argsort(-p)
    tp = np.cumsum(y[order] == 1)
    n = np.arange(1, len(p) + 1)
    prec = tp / n
    ok = np.nonzero((prec >= target) & (n >= min_accepted))[0]
    return float(p[order][ok[-1]]) if len(ok) else float("inf")


def _best_at_recall(p: Arr, y: Arr, recall: float) -> dict[str, Any]:
    """Upper bound: the highest precision of any threshold with recall ≥ ``recall`` (chosen on the data)."""
    order = np.argsort(-p)
    tp = np.cumsum(y[order] == 1)
    n = np.arange(1, len(p) + 1)
    i = int(np.searchsorted(tp, np.ceil(recall * y.sum())))
    i = min(i, len(p) - 1)
    prec = tp[i:] / n[i:]
    j = i + int(np.argmax(prec))
    lo, hi = wilson(int(tp[j]), int(n[j]))
    return {"precision": round(float(prec.max()), 4), "wilson95": [round(lo, 4), round(hi, 4)],
            "recall": round(float(tp[j] / y.sum()), 4), "accepted": int(n[j])}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=RESULTS / "semantic_frontier.json")
    args = ap.parse_args(argv)
    from sklearn.ensemble import HistGradientBoostingClassifier

    t0 = time.perf_counter()
    _, _, d, fit, embed_info = load_pair_data(args.data, ("qqp_val", "qqp_test"))
    val, test = d["qqp_val"], d["qqp_test"]
    scores: dict[str, tuple[Arr, Arr]] = {"cosine": (val["cos"], test["cos"])}
    logit = fit_logistic(fit["sig"], fit["y"], 100.0)
    scores["logistic_signals"] = (predict(logit, val["sig"]), predict(logit, test["sig"]))
    for name, feats in (("boosted_signals", "sig"), ("boosted_signals_vectors", "both")):
        xs = {s: (x["sig"] if feats == "sig" else np.hstack([x["sig"], x["emb"]])) for s, x in
              (("fit", fit), ("val", val), ("test", test))}  # fmt: skip
        clf = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, l2_regularization=1.0, random_state=0)
        clf.fit(xs["fit"], fit["y"])
        scores[name] = (clf.predict_proba(xs["val"])[:, 1], clf.predict_proba(xs["test"])[:, 1])
    report: dict[str, Any] = {
        "data": {
            "qqp_test_pairs": len(test["y"]),
            "qqp_test_duplicates": int(test["y"].sum()),
            "fit_pairs": len(fit["y"]),
            "val_pairs": len(val["y"]),
        },
        "embedder": embed_info.get("model"),
        "target": {"precision": TARGET_PRECISION, "wilson_lower": 0.93, "recall": TARGET_RECALL},
        "rules": {},
    }
    for name, (pv, pt) in scores.items():
        t = _choose(pv, val["y"], TARGET_PRECISION)
        row = {
            "val_threshold_for_0.95": _at_threshold(pt, test["y"], t) if np.isfinite(t) else None,
            "test_upper_bound_at_recall_0.30": _best_at_recall(pt, test["y"], TARGET_RECALL),
        }
        report["rules"][name] = row
        print(f"{name:26s} val-chosen: {row['val_threshold_for_0.95']}\n{'':26s} bound @R≥0.30: "
              f"{row['test_upper_bound_at_recall_0.30']}", flush=True)  # fmt: skip
    report["seconds"] = round(time.perf_counter() - t0, 1)
    write_report(args.out, report)


if __name__ == "__main__":
    main()
