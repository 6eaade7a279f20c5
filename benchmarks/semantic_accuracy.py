"""Semantic-cache accuracy on pairs the decision never saw: precision (95% Wilson), recall, accepted.

    python benchmarks/semantic_accuracy.py [--data ../shared/data] [--out benchmarks/results/semantic.json]

What a semantic hit is.  The semantic cache (DESIGN.md §3.2) proposes a cached query whose vector is
close to the new query's and serves its answer if the accept decision says yes
(``ragline.cache.semantic_decision.decide``: candidate floor ``semantic_min_cosine``, hard vetoes,
then the fitted model's probability ≥ the profile's threshold).  A wrong accept serves a wrong
answer, so **precision is what matters**; recall is the share of true paraphrases that hit.

Data (``benchmarks/_pairs.py``): the model is fitted on the QQP *fit* components and STS-B train,
its thresholds are chosen on QQP *val* and STS-B dev (``benchmarks/semantic_fit.py``); this script
reports the **test** splits: QQP test (35% of the shared sample, whole connected components of
shared questions, so no question of it appears in fit or val) and STS-B test, separately.  Val is
shown too, marked as the split the thresholds were chosen on.

Rules measured on the same vectors (MiniLM, texts in query form), same pairs:

* ``ragline balanced`` (the default), ``ragline strict``, and the signals-only model (used when the
  embedder's vectors are not the dimension the model was fitted on);
* ``ragline before``: cosine ≥ 0.93 and every guard (the rule this replaces);
* cosine only at 0.93;
* peers' default rules: RedisVL ``SemanticCache`` (cosine distance ≤ 0.1, i.e. cos ≥ 0.9); LangChain's
  ``RedisSemanticCache`` and LiteLLM's documented ``similarity_threshold`` 0.8 (cos ≥ 0.8); GPTCache's
  default (``SearchDistanceEvaluation``, max distance 4 on squared L2, ``similarity_threshold`` 0.8:
  squared L2 ≤ 0.8, i.e. cos ≥ 0.6).

Also per guard and structure check: among the candidates (cos ≥ floor), how often it flags a
non-duplicate (it would be right to reject) and a duplicate (wrong).  Labels: QQP ``is_duplicate``,
STS-B score ≥ 4 ("mostly equivalent").
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from _common import DATA, RESULTS
from _pairs import STS_POSITIVE, embed_all, load_splits

from ragline.cache.guards import extract_features, guards_pass
from ragline.cache.semantic_decision import SIGNALS, decide, guards_accept, load_model

REPORTED = ("qqp_test", "stsb_test", "qqp_val", "stsb_val")
BINARY = tuple(s for s in SIGNALS[1:] if not s.endswith(("jaccard", "_diff", "_ratio")))


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (precision over n accepted pairs)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (round(centre - half, 4), round(centre + half, 4))


def prf(accept: npt.NDArray[np.bool_], y: npt.NDArray[np.int8]) -> dict[str, Any]:
    tp = int((accept & (y == 1)).sum())
    fp = int((accept & (y == 0)).sum())
    pos = int((y == 1).sum())
    return {
        "precision": round(tp / (tp + fp), 4) if tp + fp else 1.0,
        "precision_ci95": wilson(tp, tp + fp),
        "recall": round(tp / pos, 4) if pos else 0.0,
        "accepted": tp + fp,
        "tp": tp,
        "fp": fp,
        "positives": pos,
    }


def run(data: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    splits = load_splits(data)
    index, vectors, embed_info = embed_all(splits)
    model = load_model()
    out: dict[str, Any] = {}
    decide_s = 0.0
    decide_n = 0
    for name in REPORTED:
        s = splits[name]
        va, vb = vectors[[index[t] for t in s.a]], vectors[[index[t] for t in s.b]]
        cos = np.clip(np.einsum("ij,ij->i", va, vb), 0.0, 1.0)
        feats = {t: extract_features(t) for t in {*s.a, *s.b}}
        rules: dict[str, npt.NDArray[np.bool_]] = {}
        for label, profile, vec in (
            ("ragline model balanced", "balanced", True),
            ("ragline model strict", "strict", True),
        ):
            acc = []
            c0 = time.perf_counter()
            for i, (a, b) in enumerate(zip(s.a, s.b, strict=True)):
                u, v = (va[i], vb[i]) if vec else (None, None)
                acc.append(decide(model, profile, a, b, float(cos[i]), u, v, feats[a]).accept)
            if label == "ragline model balanced":
                decide_s += time.perf_counter() - c0
                decide_n += len(acc)
            rules[label] = np.array(acc, dtype=bool)
        guards_ok = np.array([guards_pass(feats[a], feats[b])[0] for a, b in zip(s.a, s.b, strict=True)])
        for label, profile in (("guards balanced (default)", "balanced"), ("guards strict", "strict")):
            rules[f"ragline {label}"] = np.array(
                [guards_accept(profile, a, b, float(c), feats[a]) for a, b, c in zip(s.a, s.b, cos, strict=True)]
            )
        rules["ragline before (cos >= 0.93 + all guards)"] = (cos >= 0.93) & guards_ok
        rules["cosine only >= 0.93"] = cos >= 0.93
        rules["RedisVL default (distance 0.1: cos >= 0.90)"] = cos >= 0.90
        rules["LangChain RedisSemanticCache / LiteLLM 0.8 (cos >= 0.80)"] = cos >= 0.80
        rules["GPTCache default (squared L2 <= 0.8: cos >= 0.60)"] = cos >= 0.60
        # each binary signal among the candidates: right (flags a non-duplicate) vs wrong (a duplicate)
        from ragline.cache.semantic_decision import signals

        cand = cos >= model.min_cosine
        flags: dict[str, dict[str, int]] = {}
        sig = np.stack([signals(a, b, float(c), feats[a], feats[b]) for a, b, c in zip(s.a, s.b, cos, strict=True)])
        for sname in BINARY:
            f = cand & (sig[:, SIGNALS.index(sname)] > 0)
            flags[sname] = {
                "right": int((f & (s.y == 0)).sum()),
                "wrong": int((f & (s.y == 1)).sum()),
                "veto": sname in model.vetoes,
            }
        out[name] = {
            "pairs": len(s.y),
            "positives": int(s.y.sum()),
            "candidates": int(cand.sum()),
            "rules": {k: prf(v, s.y) for k, v in rules.items()},
            "signal_flags_among_candidates": flags,
        }
    return {
        "benchmark": "semantic_accuracy",
        "similarity": "cosine of L2-normalised all-MiniLM-L6-v2 vectors of the texts in query form, clipped to [0, 1]",
        "labels": {"qqp": "is_duplicate == 1", "stsb": f"score >= {STS_POSITIVE}"},
        "splits": "benchmarks/_pairs.py: QQP by connected component fit/val/test 45/20/35; STS-B train/dev/test",
        "fitted_on": "qqp_fit + stsb_fit; thresholds chosen on qqp_val + stsb_val; test splits seen by no step",
        "model": {
            "min_cosine": model.min_cosine,
            "vetoes": list(model.vetoes),
            "thresholds": model.thresholds,
            "thresholds_signals_only": model.thresholds_signals_only,
            "meta": model.meta,
        },
        "results": out,
        "timing": {
            "embedding": embed_info,
            "decide_us_per_pair": round(decide_s / max(decide_n, 1) * 1e6, 1),
            "total_seconds": round(time.perf_counter() - t0, 1),
        },
    }


def print_table(report: dict[str, Any]) -> None:
    for name, row in report["results"].items():
        note = "  (thresholds chosen here)" if name.endswith("val") else ""
        print(f"\n{name}: {row['pairs']} pairs, {row['positives']} positive, {row['candidates']} candidates{note}")
        print(f"  {'rule':<58}{'precision':>10}{'95% CI':>18}{'recall':>8}{'accepted':>10}")
        for rule, m in row["rules"].items():
            ci = f"[{m['precision_ci95'][0]:.3f}, {m['precision_ci95'][1]:.3f}]"
            print(f"  {rule:<58}{m['precision']:>10.3f}{ci:>18}{m['recall']:>8.3f}{m['accepted']:>10}")
    print("\nsignal flags among QQP test candidates (right = flags a non-duplicate, wrong = a duplicate):")
    for sname, c in report["results"]["qqp_test"]["signal_flags_among_candidates"].items():
        print(f"  {sname:<22} right {c['right']:5d}  wrong {c['wrong']:5d}{'  (hard veto)' if c['veto'] else ''}")
    print(f"\ndecide: {report['timing']['decide_us_per_pair']} µs/pair; total {report['timing']['total_seconds']} s")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--data", type=Path, default=DATA, help="folder holding qqp/ and stsb/")
    ap.add_argument("--out", type=Path, default=RESULTS / "semantic.json")
    args = ap.parse_args(argv)
    report = run(args.data.resolve())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print_table(report)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
