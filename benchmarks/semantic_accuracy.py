"""Semantic-cache accuracy: calibrate τ and measure the accept decision on real data.

    python benchmarks/semantic_accuracy.py [--out benchmarks/results/semantic.json]
        [--data ../shared/data] [--max-qqp-pairs N] [--embeddings-cache PATH]

What a semantic hit is.  The semantic cache (DESIGN.md §3.2) proposes a cached
query whose embedding is close to the new query's and serves its answer when

    accept = cos(q_new, q_cached) ≥ τ  AND  guards_pass(features(q_new), features(q_cached))

A wrong accept serves a wrong answer, so **precision is what matters**; recall
is the share of true paraphrases that hit the cache.  This script measures both
decisions, with and without guards, on labelled sentence pairs:

* QQP (``qqp/qqp_pairs_sample.tsv``, 10,000 Quora question pairs): positive =
  ``is_duplicate == 1``.  The file is already in random order; the first half
  is the calibration split, the second half is held out.
* STS-B (``stsb/sts-{train,test}.csv``, graded 0–5): positive = score ≥ 4.0.
  The STS-B guidelines describe 4 as "mostly equivalent, some unimportant
  details differ" and 5 as "completely equivalent"; below 4 "some important
  information differs", which for a cache would be a wrong answer.  train is
  calibration, test is held out (dev is not used).

Similarity scale (the one documented scale of ``CacheSettings.semantic_threshold``):
the cosine of the L2-normalised all-MiniLM-L6-v2 vectors produced by
``LocalEmbedder``, clipped to [0, 1] (negative cosines never matter for a hit).

Calibration rule: the default τ is the smallest τ on the grid such that the
precision *with guards* on the pooled calibration split (QQP first half +
STS-B train) is ≥ the target (0.95) at τ and at every larger τ of the grid (the
second condition keeps a lucky dip from choosing τ).  The held-out numbers at
that τ are what we report; the no-guard baseline is measured in the same run.

Output: a JSON report and a PNG plot (precision and recall vs τ, with and
without guards) in ``benchmarks/results/``, plus a compact table on stdout.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ragline.cache.guards import ALL_CHECKS, QueryFeatures, extract_features, guards_pass  # noqa: E402
from ragline.config import EmbedderSettings  # noqa: E402

STS_POSITIVE = 4.0
TARGET_PRECISION = 0.95
CALIBRATION = ("qqp_cal", "stsb_train")
HELD_OUT = ("qqp_heldout", "stsb_test")


@dataclass
class Split:
    """Labelled sentence pairs; ``y`` is 1 when serving one's answer for the other is right."""

    name: str
    a: list[str]
    b: list[str]
    y: npt.NDArray[np.int8]


# --------------------------------------------------------------------------- data


def load_qqp(path: Path, limit: int) -> list[tuple[str, str, int]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        if header[:4] != ["source_index", "question1", "question2", "is_duplicate"]:
            raise SystemExit(f"{path}: unexpected header {header}")
        rows = [(r[1], r[2], int(r[3])) for r in reader if len(r) >= 4]
    return rows[:limit] if limit else rows


def load_sts(path: Path) -> list[tuple[str, str, int]]:
    rows = []
    with path.open(encoding="utf-8", newline="") as f:
        for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(r) < 7:
                continue
            rows.append((r[5], r[6], int(float(r[4]) >= STS_POSITIVE)))
    return rows


def make_split(name: str, rows: list[tuple[str, str, int]]) -> Split:
    return Split(name, [r[0] for r in rows], [r[1] for r in rows], np.array([r[2] for r in rows], np.int8))


def load_splits(data: Path, max_qqp_pairs: int) -> dict[str, Split]:
    qqp = load_qqp(data / "qqp" / "qqp_pairs_sample.tsv", max_qqp_pairs)
    half = len(qqp) // 2
    return {
        "qqp_cal": make_split("qqp_cal", qqp[:half]),
        "stsb_train": make_split("stsb_train", load_sts(data / "stsb" / "sts-train.csv")),
        "qqp_heldout": make_split("qqp_heldout", qqp[half:]),
        "stsb_test": make_split("stsb_test", load_sts(data / "stsb" / "sts-test.csv")),
    }


# --------------------------------------------------------------------------- embeddings


def embed_texts(texts: list[str], batch_size: int, cache: Path | None) -> tuple[dict[str, int], Any, dict[str, Any]]:
    """Embed every distinct text once; optionally reuse vectors from an .npz cache."""
    digest = hashlib.blake2b("\n".join(texts).encode(), digest_size=16).hexdigest()
    info: dict[str, Any] = {"texts": len(texts), "batch_size": batch_size}
    index = {t: i for i, t in enumerate(texts)}
    if cache is not None and cache.is_file():
        z = np.load(cache, allow_pickle=False)
        if str(z["digest"]) == digest:
            info.update(model=str(z["model"]), seconds=0.0, cached=True)
            return index, z["vectors"], info
    from ragline.embed.local import LocalEmbedder

    t0 = time.perf_counter()
    embedder = LocalEmbedder(EmbedderSettings(batch_size=batch_size))
    info["load_seconds"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    vectors = embedder.embed(texts)
    seconds = time.perf_counter() - t0
    info.update(
        model=embedder.id, seconds=round(seconds, 2), texts_per_second=round(len(texts) / seconds, 1), cached=False
    )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, digest=digest, model=embedder.id, vectors=vectors)
    return index, vectors, info


# --------------------------------------------------------------------------- metrics


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
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / pos if pos else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {
        "precision": round(p, 4),
        "recall": round(r, 4),
        "f1": round(f1, 4),
        "accepted": tp + fp,
        "tp": tp,
        "fp": fp,
        "positives": pos,
        "precision_ci95": wilson(tp, tp + fp),
    }


def choose_tau(grid: list[float], precision: list[float], target: float) -> float | None:
    """Smallest τ whose precision, and that of every larger τ on the grid, meets the target."""
    for i, tau in enumerate(grid):
        if all(p >= target for p in precision[i:]):
            return tau
    return None


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    splits = load_splits(args.data, args.max_qqp_pairs)
    texts = sorted({t for s in splits.values() for t in (*s.a, *s.b)})
    index, vectors, embed_info = embed_texts(texts, args.batch_size, args.embeddings_cache)

    t0 = time.perf_counter()
    features: dict[str, QueryFeatures] = {t: extract_features(t) for t in texts}
    feature_us = (time.perf_counter() - t0) / len(texts) * 1e6

    grid = [round(x, 4) for x in np.arange(args.grid_start, args.grid_stop + 1e-9, args.grid_step)]
    cos: dict[str, npt.NDArray[np.float32]] = {}
    gpass: dict[str, npt.NDArray[np.bool_]] = {}
    reasons: dict[str, list[str]] = {}
    guard_seconds = 0.0
    guard_calls = 0
    for name, s in splits.items():
        va = vectors[[index[t] for t in s.a]]
        vb = vectors[[index[t] for t in s.b]]
        cos[name] = np.clip(np.einsum("ij,ij->i", va, vb), 0.0, 1.0)
        t0 = time.perf_counter()
        results = [guards_pass(features[x], features[z]) for x, z in zip(s.a, s.b, strict=True)]
        guard_seconds += time.perf_counter() - t0
        guard_calls += len(results)
        gpass[name] = np.array([ok for ok, _ in results], dtype=bool)
        reasons[name] = [r for _, r in results]

    # pooled calibration split
    cal_cos = np.concatenate([cos[n] for n in CALIBRATION])
    cal_y = np.concatenate([splits[n].y for n in CALIBRATION])
    cal_g = np.concatenate([gpass[n] for n in CALIBRATION])

    curves: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name, c, y, g in [("calibration", cal_cos, cal_y, cal_g)] + [
        (n, cos[n], splits[n].y, gpass[n]) for n in splits
    ]:
        curves[name] = {
            "no_guards": [prf(c >= t, y) for t in grid],
            "guards": [prf((c >= t) & g, y) for t in grid],
        }

    target = args.target_precision
    tau = choose_tau(grid, [m["precision"] for m in curves["calibration"]["guards"]], target)
    tau_baseline = choose_tau(grid, [m["precision"] for m in curves["calibration"]["no_guards"]], target)
    chosen = tau if tau is not None else grid[-1]

    def at(t: float, names: tuple[str, ...]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for n in names:
            c, y, g = cos[n], splits[n].y, gpass[n]
            cand = c >= t
            rej: Counter[str] = Counter()
            for i in np.flatnonzero(cand & ~g):
                key = reasons[n][i].split(":")[0]
                rej[f"{key} ({'duplicate' if y[i] else 'non-duplicate'})"] += 1
            out[n] = {
                "no_guards": prf(cand, y),
                "guards": prf(cand & g, y),
                "candidates": int(cand.sum()),
                "guard_rejections": dict(rej.most_common()),
            }
        return out

    # leave-one-check-out ablation on the held-out splits at the chosen τ
    ablation: dict[str, dict[str, Any]] = {}
    for drop in ALL_CHECKS:
        checks = tuple(c for c in ALL_CHECKS if c != drop)
        row = {}
        for n in HELD_OUT:
            s = splits[n]
            g = np.array([guards_pass(features[x], features[z], checks)[0] for x, z in zip(s.a, s.b, strict=True)])
            m = prf((cos[n] >= chosen) & g, s.y)
            row[n] = {"precision": m["precision"], "recall": m["recall"], "accepted": m["accepted"]}
        ablation[f"without {drop}"] = row

    report: dict[str, Any] = {
        "benchmark": "semantic_accuracy",
        "similarity": "cosine of L2-normalised all-MiniLM-L6-v2 vectors (LocalEmbedder), clipped to [0, 1]",
        "accept_rule": "cos >= tau AND guards_pass (ragline.cache.guards, all checks)",
        "labels": {"qqp": "is_duplicate == 1", "stsb": f"score >= {STS_POSITIVE}"},
        "data": {
            "path": str(args.data),
            "splits": {n: {"pairs": len(s.y), "positives": int(s.y.sum())} for n, s in splits.items()},
            "calibration": list(CALIBRATION),
            "held_out": list(HELD_OUT),
            "max_qqp_pairs": args.max_qqp_pairs or None,
        },
        "checks": list(ALL_CHECKS),
        "target_precision": target,
        "calibration_rule": "smallest grid tau with guarded calibration precision >= target at tau and above",
        "chosen_tau": tau,
        "baseline_tau_without_guards": tau_baseline,
        "at_chosen_tau": {"calibration": at(chosen, CALIBRATION), "held_out": at(chosen, HELD_OUT)},
        "baseline_at_its_own_tau": at(tau_baseline, HELD_OUT) if tau_baseline is not None else None,
        "ablation_held_out": ablation,
        "grid": grid,
        "curves": curves,
        "timing": {
            "embedding": embed_info,
            "extract_features_us_per_query": round(feature_us, 1),
            "guards_pass_us_per_pair": round(guard_seconds / max(guard_calls, 1) * 1e6, 2),
            "total_seconds": round(time.perf_counter() - started, 1),
        },
    }
    return report


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = report["grid"]
    names = ["calibration", *HELD_OUT]
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.2), sharey=True)
    for ax, name in zip(axes, names, strict=True):
        cur = report["curves"][name]
        for key, style, label in (("no_guards", "--", "cos only"), ("guards", "-", "cos + guards")):
            ax.plot(grid, [m["precision"] for m in cur[key]], style, color="tab:blue", label=f"precision, {label}")
            ax.plot(grid, [m["recall"] for m in cur[key]], style, color="tab:orange", label=f"recall, {label}")
        ax.axhline(report["target_precision"], color="grey", lw=0.8, ls=":")
        if report["chosen_tau"] is not None:
            ax.axvline(report["chosen_tau"], color="tab:red", lw=0.8, ls=":", label=f"τ = {report['chosen_tau']}")
        ax.set_title(name)
        ax.set_xlabel("τ (cosine, 0–1)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("precision / recall")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("Semantic cache accept decision: cos ≥ τ, with and without guards (MiniLM-L6-v2)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(report: dict[str, Any]) -> None:
    tau = report["chosen_tau"]
    print(f"\nchosen τ = {tau}  (smallest τ with calibration precision with guards ≥ {report['target_precision']})")
    print(f"baseline τ without guards = {report['baseline_tau_without_guards']}")
    head = f"{'split':<13}{'decision':<14}{'precision':>10}{'95% CI':>17}{'recall':>8}{'F1':>7}{'accepted':>10}"
    print(head)
    print("-" * len(head))
    for part in ("calibration", "held_out"):
        for name, row in report["at_chosen_tau"][part].items():
            for key, label in (("no_guards", "cos only"), ("guards", "cos + guards")):
                m = row[key]
                ci = f"[{m['precision_ci95'][0]:.3f}, {m['precision_ci95'][1]:.3f}]"
                print(
                    f"{name:<13}{label:<14}{m['precision']:>10.3f}{ci:>17}{m['recall']:>8.3f}{m['f1']:>7.3f}"
                    f"{m['accepted']:>10}"
                )
    print("\nguard rejections at τ on held-out QQP (candidates with cos ≥ τ):")
    for k, v in report["at_chosen_tau"]["held_out"]["qqp_heldout"]["guard_rejections"].items():
        print(f"  {v:5d}  {k}")
    t = report["timing"]
    print(
        f"\nembedding {t['embedding'].get('texts')} texts: {t['embedding'].get('seconds')} s; "
        f"extract_features {t['extract_features_us_per_query']} µs/query; "
        f"guards_pass {t['guards_pass_us_per_pair']} µs/pair; total {t['total_seconds']} s"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument(
        "--data",
        type=Path,
        default=REPO / ".." / "shared" / "data",
        help="folder holding qqp/ and stsb/ (default: ../shared/data next to the repo)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=REPO / "benchmarks" / "results" / "semantic.json",
        help="JSON report; the plot is written next to it with a .png suffix",
    )
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument(
        "--max-qqp-pairs",
        type=int,
        default=0,
        help="use only the first N QQP pairs (the file is in random order); 0 = all",
    )
    ap.add_argument(
        "--embeddings-cache",
        type=Path,
        default=None,
        help="optional .npz to reuse vectors between runs (keyed by the exact text set)",
    )
    ap.add_argument("--target-precision", type=float, default=TARGET_PRECISION)
    ap.add_argument("--grid-start", type=float, default=0.80)
    ap.add_argument("--grid-stop", type=float, default=0.99)
    ap.add_argument("--grid-step", type=float, default=0.01)
    args = ap.parse_args(argv)
    args.data = args.data.resolve()

    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    png = args.out.with_suffix(".png")
    plot(report, png)
    print_table(report)
    print(f"\nwrote {args.out} and {png}")


if __name__ == "__main__":
    main()
