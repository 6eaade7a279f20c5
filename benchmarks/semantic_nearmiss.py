"""Semantic near-misses on SciFact: close claims whose evidence differs must never share an answer.

    python benchmarks/semantic_nearmiss.py [--data ../shared/data/scifact] [--extra-docs 700] [--tau T]

Pairs of *different* SciFact test claims whose cosine similarity is ≥ τ but
whose relevant documents differ are exactly the case where a similarity-only
semantic cache serves a wrong answer.  For each pair the first claim is asked
(its answer is cached), then the second; we count how often the second is
served the first's answer, in three configurations measured in the same run:

* similarity only (no decision, no retrieval verification) — the baseline;
* the accept decision only (``ragline.cache.semantic_decision``, default profile);
* decision + retrieval verification (ragline's default) — must accept 0.

τ here is the cosine floor of the candidates (``semantic_min_cosine``, default 0.80).
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
from _common import DATA, RESULTS, load_beir

from ragline.config import EmbedderSettings, Settings
from ragline.embed.local import LocalEmbedder
from ragline.ingest.loaders import iter_documents
from ragline.pipeline import AsyncRAG


def near_miss_pairs(
    claims: dict[str, str], qrels: dict[str, dict[str, int]], vecs: np.ndarray, tau: float
) -> list[tuple[str, str, float]]:
    ids = list(claims)
    sims = vecs @ vecs.T
    out = []
    for i in range(len(ids)):
        for j in range(i + 1, len(ids)):
            if (
                sims[i, j] >= tau
                and set(qrels[ids[i]]) != set(qrels[ids[j]])
                and claims[ids[i]].strip().lower() != claims[ids[j]].strip().lower()
            ):
                out.append((ids[i], ids[j], float(sims[i, j])))
    return out


async def _accepted(
    settings: Settings,
    embedder: LocalEmbedder,
    docs: list[Any],
    pairs: list[tuple[str, str, float]],
    claims: dict[str, str],
) -> dict[str, Any]:
    accepted = 0
    examples: list[dict[str, Any]] = []
    async with AsyncRAG(settings, embedder=embedder) as rag:
        await rag.ingest(docs)
        for a, b, sim in pairs:
            await rag.invalidate(everything=True)
            await rag.ask(claims[a])
            ans = await rag.ask(claims[b])
            if ans.cache.kind == "semantic":
                accepted += 1
                if len(examples) < 5:
                    examples.append({"cached": claims[a], "asked": claims[b], "similarity": round(sim, 4)})
    return {"pairs": len(pairs), "accepted": accepted, "examples": examples}


def run(
    data: Path,
    out_dir: Path,
    extra_docs: int = 700,
    seed: int = 3,
    tau: float | None = None,
    only: tuple[str, ...] = (),
) -> dict[str, Any]:
    """``tau`` defaults to the configured threshold; a lower one stresses the guards and verification."""
    data = data.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    claims, qrels = load_beir(data, "test")
    train_claims, train_qrels = load_beir(data, "train")
    claims.update(train_claims)  # all 1,109 claims: more near-miss pairs than the 300 test ones alone
    qrels.update(train_qrels)
    base = Settings()
    tau = base.cache.semantic_min_cosine if tau is None else tau
    embedder = LocalEmbedder(EmbedderSettings())
    ids = list(claims)
    vecs = embedder.embed([claims[i] for i in ids])
    pairs = near_miss_pairs(claims, qrels, vecs, tau)
    # the corpus: every relevant document of the claims in a pair, plus random distractors
    relevant = {d for a, b, _ in pairs for q in (a, b) for d in qrels[q]}
    docs = list(iter_documents([data / "corpus.jsonl"], base.limits))
    rng = random.Random(seed)
    others = [d for d in docs if d.id not in relevant]
    corpus = [d for d in docs if d.id in relevant] + rng.sample(others, min(extra_docs, len(others)))
    print(f"τ={tau}: {len(pairs)} near-miss pairs among {len(ids)} claims; corpus {len(corpus)} docs", flush=True)
    report: dict[str, Any] = {"tau": tau, "claims": len(ids), "corpus_docs": len(corpus)}
    configs = {
        "similarity_only": {"semantic_guards": False, "semantic_verify_retrieval": False},
        "decision_only": {"semantic_guards": True, "semantic_verify_retrieval": False},
        "decision_and_verification": {"semantic_guards": True, "semantic_verify_retrieval": True},
    }
    for name, cache in configs.items():
        if only and name not in only:
            continue
        with tempfile.TemporaryDirectory(prefix="ragline-nearmiss-") as tmp:
            settings = Settings(data_dir=Path(tmp), cache={"enabled": True, "semantic_min_cosine": tau, **cache})
            t0 = time.perf_counter()
            res = asyncio.run(_accepted(settings, embedder, corpus, pairs, claims))
            res["wall_s"] = round(time.perf_counter() - t0, 1)
        report[name] = res
        print(f"{name}: accepted {res['accepted']} of {res['pairs']}", flush=True)
    if "decision_and_verification" in report:
        report["checks"] = {"zero_accepted_with_verification": report["decision_and_verification"]["accepted"] == 0}
    (out_dir / f"nearmiss_tau{tau:.2f}.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="SciFact near-miss pairs: semantic hits with and without guards.")
    ap.add_argument("--data", type=Path, default=DATA / "scifact")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--extra-docs", type=int, default=700)
    ap.add_argument("--tau", type=float, default=None, help="candidate floor; default: semantic_min_cosine")
    ap.add_argument("--configs", default="", help="comma-separated subset of the configurations (default: all)")
    a = ap.parse_args(argv)
    run(a.data, a.out, a.extra_docs, tau=a.tau, only=tuple(c for c in a.configs.split(",") if c))


if __name__ == "__main__":
    main()
