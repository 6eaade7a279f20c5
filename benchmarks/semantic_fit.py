"""Fit the semantic cache's accept model (ragline/cache/semantic_model.json) on the shared QQP and STS-B.

    python benchmarks/semantic_fit.py [--data ../shared/data] [--out ragline/cache/semantic_model.json]

Splits (``benchmarks/_pairs.py``): QQP by connected component of shared questions into fit / val /
test (45 / 20 / 35%), STS-B train / dev / test.  This script reads **fit** and **val** only:

1. Signals of every pair (``ragline.cache.semantic_decision.signals``) plus, for the full model,
   ``u ⊙ v`` and ``|u − v|`` of the MiniLM vectors of the texts in query form.
2. L2-regularised logistic regression (L-BFGS, scipy; the run-time model is pure numpy), on the fit pairs whose cosine
   is at least ``--fit-floor`` (the region the ANN proposes); the regularisation strength is the one
   of ``--lambdas`` with the best QQP-val recall at the balanced precision target.
3. Hard vetoes: a binary signal is a veto when, among the fit candidates (cosine ≥ ``--min-cosine``),
   the pairs it flags are non-duplicates (the veto is right) at least ``--veto-ratio`` times as often
   as duplicates (wrong), with at least ``--veto-min`` right.  Every signal's counts are reported.
4. Thresholds: for each profile, the smallest probability on a grid at which the precision of the
   decision (candidates, minus vetoes, probability ≥ t) on QQP val and STS-B dev pooled is ≥ the
   profile's target, with at least 50 (balanced) or 25 (strict) pairs accepted: ``balanced`` 0.94,
   ``strict`` 0.96.
5. The model with embedding features is used at run time only if its QQP-val recall at the balanced
   threshold beats the signals-only model's (``use_vectors``); on MiniLM it does not (it overfits the
   768 interaction features), so the shipped decision needs no particular embedder.

Writes the model JSON and ``benchmarks/results/semantic_fit.json`` (veto counts, val curves).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from _common import DATA, REPO, RESULTS
from _pairs import Split, embed_all, load_splits

from ragline.cache.guards import extract_features
from ragline.cache.semantic_decision import SIGNALS, signals

PROFILES = {"balanced": 0.94, "strict": 0.96}
MIN_ACCEPTED = {"balanced": 50, "strict": 25}
"""Val pairs a profile's threshold must accept: fewer are too noisy to choose by."""
BINARY = tuple(s for s in SIGNALS if s not in ("cos", "content_jaccard", "terms_jaccard", "content_diff",
                                                "length_ratio", "entity_diff", "number_diff"))  # fmt: skip
GRID = [round(x, 3) for x in np.arange(0.30, 0.996, 0.005)]

Arr = npt.NDArray[np.float64]


def pair_data(s: Split, index: dict[str, int], vectors: npt.NDArray[np.float32]) -> dict[str, Any]:
    """Cosine, signals and embedding interaction features of every pair of a split."""
    va = vectors[[index[t] for t in s.a]].astype(np.float64)
    vb = vectors[[index[t] for t in s.b]].astype(np.float64)
    cos = np.clip(np.einsum("ij,ij->i", va, vb), 0.0, 1.0)
    feats = {t: extract_features(t) for t in {*s.a, *s.b}}
    sig = np.stack([signals(a, b, float(c), feats[a], feats[b]) for a, b, c in zip(s.a, s.b, cos, strict=True)])
    return {"cos": cos, "sig": sig, "emb": np.hstack([va * vb, np.abs(va - vb)]), "y": s.y.astype(np.float64)}


def load_pair_data(
    data: Path, names: tuple[str, ...]
) -> tuple[dict[str, Split], npt.NDArray[np.float32], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The splits, their vectors, the pair data of the named splits plus the fit ones, the fit set
    (QQP fit + STS-B train, concatenated) and the embedding info."""
    splits = load_splits(data.resolve())
    index, vectors, embed_info = embed_all(splits)
    d = {n: pair_data(splits[n], index, vectors) for n in {"qqp_fit", "stsb_fit", *names}}
    fit = {k: np.concatenate([d["qqp_fit"][k], d["stsb_fit"][k]]) for k in ("cos", "sig", "emb", "y")}
    return splits, vectors, d, fit, embed_info


def fit_logistic(x: Arr, y: Arr, lam: float, iters: int = 500) -> tuple[Arr, Arr, Arr, float]:
    """Standardise, then minimise the L2-penalised log-loss (bias not penalised) with L-BFGS."""
    from scipy.optimize import minimize

    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-9] = 1.0
    z = (x - mean) / scale

    def loss(wb: Arr) -> tuple[float, Arr]:
        w, b = wb[:-1], wb[-1]
        m = z @ w + b
        # log(1 + e^m) - y m, computed stably
        val = float(np.sum(np.logaddexp(0.0, m) - y * m) + 0.5 * lam * (w @ w))
        p = 1.0 / (1.0 + np.exp(-m))
        g = np.empty_like(wb)
        g[:-1] = z.T @ (p - y) + lam * w
        g[-1] = float(np.sum(p - y))
        return val, g

    res = minimize(loss, np.zeros(z.shape[1] + 1), jac=True, method="L-BFGS-B", options={"maxiter": iters})
    return mean, scale, res.x[:-1], float(res.x[-1])


def predict(model: tuple[Arr, Arr, Arr, float], x: Arr) -> Arr:
    mean, scale, w, b = model
    return 1.0 / (1.0 + np.exp(-(((x - mean) / scale) @ w + b)))


def precision_curve(p: Arr, y: Arr, ok: npt.NDArray[np.bool_]) -> list[dict[str, Any]]:
    out = []
    pos = int(y.sum())
    for t in GRID:
        acc = ok & (p >= t)
        tp = int((acc & (y == 1)).sum())
        n = int(acc.sum())
        out.append(
            {"t": t, "accepted": n, "tp": tp, "precision": tp / n if n else 1.0, "recall": tp / pos if pos else 0.0}
        )
    return out


def smallest_threshold(curve: list[dict[str, Any]], target: float, min_accepted: int) -> float:
    """The smallest grid threshold whose (cumulative) precision meets the target, with at least
    ``MIN_ACCEPTED`` pairs accepted (fewer are too noisy to choose by)."""
    for row in curve:
        if row["precision"] >= target and row["accepted"] >= min_accepted:
            return float(row["t"])
    return float(GRID[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=REPO / "ragline" / "cache" / "semantic_model.json")
    ap.add_argument("--report", type=Path, default=RESULTS / "semantic_fit.json")
    ap.add_argument("--fit-floor", type=float, default=0.70)
    ap.add_argument("--min-cosine", type=float, default=0.80)
    ap.add_argument("--lambdas", default="30,100,300", help="for the signals-only model")
    ap.add_argument("--lambdas-full", default="1000,3000", help="for the model with embedding features")
    ap.add_argument("--veto-ratio", type=float, default=4.0)
    ap.add_argument("--veto-min", type=int, default=3)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    splits, vectors, d, fit, embed_info = load_pair_data(args.data, ("qqp_val", "stsb_val"))
    region = fit["cos"] >= args.fit_floor
    x_sig = fit["sig"][region]
    x_full = np.hstack([x_sig, fit["emb"][region]])
    y = fit["y"][region]

    # vetoes: counted on the fit candidates
    cand = fit["cos"] >= args.min_cosine
    veto_counts: dict[str, dict[str, int]] = {}
    vetoes: list[str] = []
    for name in BINARY:
        flag = cand & (fit["sig"][:, SIGNALS.index(name)] > 0)
        right = int((flag & (fit["y"] == 0)).sum())
        wrong = int((flag & (fit["y"] == 1)).sum())
        veto_counts[name] = {"right": right, "wrong": wrong}
        if right >= args.veto_min and right >= args.veto_ratio * wrong:
            vetoes.append(name)

    def ok_mask(part: dict[str, Any]) -> npt.NDArray[np.bool_]:
        ok = part["cos"] >= args.min_cosine
        for name in vetoes:
            ok &= part["sig"][:, SIGNALS.index(name)] == 0
        return np.asarray(ok)

    def val_thresholds(model: tuple[Arr, Arr, Arr, float], full: bool) -> tuple[dict[str, float], dict[str, Any]]:
        curves = {}
        ps, ys, oks = [], [], []
        for n in ("qqp_val", "stsb_val"):
            part = d[n]
            x = np.hstack([part["sig"], part["emb"]]) if full else part["sig"]
            ps.append(predict(model, x))
            ys.append(part["y"])
            oks.append(ok_mask(part))
            curves[n] = precision_curve(ps[-1], ys[-1], oks[-1])
        curves["pooled_val"] = precision_curve(np.concatenate(ps), np.concatenate(ys), np.concatenate(oks))
        th = {
            prof: smallest_threshold(curves["pooled_val"], target, MIN_ACCEPTED[prof])
            for prof, target in PROFILES.items()
        }
        return th, curves

    chosen: dict[str, Any] = {}
    search: dict[str, list[dict[str, Any]]] = {"full": [], "signals_only": []}
    for kind, x in (("full", x_full), ("signals_only", x_sig)):
        best = None
        for lam in [float(v) for v in (args.lambdas_full if kind == "full" else args.lambdas).split(",")]:
            model = fit_logistic(x, y, lam)
            th, curves = val_thresholds(model, kind == "full")
            row = next(r for r in curves["qqp_val"] if r["t"] == th["balanced"])
            search[kind].append({"lambda": lam, "thresholds": th, "qqp_val_at_balanced": row})
            print(f"{kind} λ={lam}: thresholds {th}, QQP val at balanced {row}", flush=True)
            if best is None or (row["recall"], row["precision"]) > best[0]:
                best = ((row["recall"], row["precision"]), lam, model, th, curves)
        assert best is not None
        chosen[kind] = {
            "lambda": best[1],
            "model": best[2],
            "thresholds": best[3],
            "curves": best[4],
            "recall": best[0],
        }
    use_vectors = chosen["full"]["recall"] > chosen["signals_only"]["recall"]

    def linear_json(m: tuple[Arr, Arr, Arr, float]) -> dict[str, Any]:
        mean, scale, w, b = m
        return {
            "mean": [round(float(v), 6) for v in mean],
            "scale": [round(float(v), 6) for v in scale],
            "weights": [round(float(v), 6) for v in w],
            "bias": round(b, 6),
        }

    model_json = {
        "signals": list(SIGNALS),
        "dim": int(vectors.shape[1]),
        "min_cosine": args.min_cosine,
        "use_vectors": use_vectors,
        "vetoes": vetoes,
        "thresholds": chosen["full"]["thresholds"],
        "thresholds_signals_only": chosen["signals_only"]["thresholds"],
        "full": linear_json(chosen["full"]["model"]),
        "signals_only": linear_json(chosen["signals_only"]["model"]),
        "meta": {
            "fitted_by": "benchmarks/semantic_fit.py",
            "embedder": embed_info.get("model"),
            "fit": "QQP fit components (45%) + STS-B train, pairs with cosine >= fit_floor",
            "fit_floor": args.fit_floor,
            "fit_pairs": int(region.sum()),
            "lambda": {k: v["lambda"] for k, v in chosen.items()},
            "profile_targets_on_val": PROFILES,
            "veto_counts_fit_candidates": {v: veto_counts[v] for v in vetoes},
        },
    }
    args.out.write_text(json.dumps(model_json, separators=(",", ":")) + "\n")
    report = {
        "benchmark": "semantic_fit",
        "splits": {n: {"pairs": len(s.y), "positives": int(s.y.sum())} for n, s in splits.items()},
        "embedding": embed_info,
        "fit_pairs": int(region.sum()),
        "veto_rule": f"right >= {args.veto_ratio} x wrong and right >= {args.veto_min} "
        f"(fit candidates, cos >= {args.min_cosine})",
        "signal_counts_fit_candidates": veto_counts,
        "vetoes": vetoes,
        "lambda_search": search,
        "chosen": {k: {"lambda": v["lambda"], "thresholds": v["thresholds"]} for k, v in chosen.items()},
        "use_vectors": use_vectors,
        "val_curves_full": chosen["full"]["curves"],
        "val_curves_signals_only": chosen["signals_only"]["curves"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=1))
    print(f"vetoes {vetoes}; thresholds {model_json['thresholds']}; wrote {args.out} and {args.report}")


if __name__ == "__main__":
    main()
