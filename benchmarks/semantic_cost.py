"""Cost of the semantic lookup (pipeline step 6: ANN + accept decision + retrieval verification), in process.

    python benchmarks/semantic_cost.py [--data ../shared/data/scifact] [--out benchmarks/results/semantic_cost.json]

On SciFact: a corpus of the relevant documents of 300 claims plus 300 distractors; 300 train claims
are asked (their answers cached, the semantic index holds them); then three kinds of lookups, each
a cache miss that runs step 6 against that index:

* ``near``: a cached claim with its last word dropped (a close candidate: the decision runs);
* ``other``: a SciFact test claim (mostly far from every cached one: ANN only);
* ``variant``: a cached claim with a filler prefix it did not have ("In short, ...").

Measured: ``timings["semantic"]`` of ``AsyncRAG.ask`` (the ``semantic`` stage, ms), p50/p99 per kind
and overall, with the extractive LLM.  The script uses only APIs that existed before the accept model,
so the same file measures an older checkout (``PYTHONPATH=<old checkout>``); run both on the same
machine, alternately, under the CPU lock.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from _common import DATA, REPO, RESULTS, load_beir, percentiles

from ragline.config import EmbedderSettings, Settings
from ragline.embed.local import LocalEmbedder
from ragline.ingest.loaders import iter_documents
from ragline.pipeline import AsyncRAG

N_CACHED = 300
N_OTHER = 150
DISTRACTORS = 300


async def measure(data: Path, seed: int) -> dict[str, Any]:
    train, train_qrels = load_beir(data, "train")
    test, _ = load_beir(data, "test")
    rng = random.Random(seed)
    cached_ids = rng.sample(sorted(train), N_CACHED)
    other_ids = rng.sample(sorted(test), N_OTHER)
    base = Settings()
    docs = list(iter_documents([data / "corpus.jsonl"], base.limits))
    relevant = {d for q in cached_ids for d in train_qrels[q]}
    corpus = [d for d in docs if d.id in relevant]
    corpus += rng.sample([d for d in docs if d.id not in relevant], DISTRACTORS)
    embedder = LocalEmbedder(EmbedderSettings())
    out: dict[str, list[float]] = {"near": [], "other": [], "variant": []}
    hits: dict[str, int] = dict.fromkeys(out, 0)
    with tempfile.TemporaryDirectory(prefix="ragline-semcost-") as tmp:
        settings = Settings(data_dir=Path(tmp), cache={"enabled": True})
        async with AsyncRAG(settings, embedder=embedder) as rag:
            await rag.ingest(corpus)
            for q in cached_ids:
                await rag.ask(train[q])
            lookups = [("near", " ".join(train[q].split()[:-1])) for q in cached_ids]
            lookups += [("other", test[q]) for q in other_ids]
            lookups += [("variant", "In short, " + train[q][0].lower() + train[q][1:]) for q in cached_ids]
            rng.shuffle(lookups)
            for kind, text in lookups:
                ans = await rag.ask(text)
                if "semantic" in ans.timings:
                    out[kind].append(ans.timings["semantic"] / 1000.0)
                hits[kind] += ans.cache.kind == "semantic"
    every = [x for v in out.values() for x in v]
    return {
        "all": percentiles(every),
        **{k: percentiles(v) if v else None for k, v in out.items()},
        "semantic_hits": hits,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--data", type=Path, default=DATA / "scifact")
    ap.add_argument("--out", type=Path, default=RESULTS / "semantic_cost.json")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--label", default="")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    res = asyncio.run(measure(a.data.resolve(), a.seed))
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    report = {"benchmark": "semantic_cost", "label": a.label, "commit": commit, "seed": a.seed, **res}
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
