"""In-process exact-hit latency of two checkouts, measured alternately in one run.

    python benchmarks/exact_hit_ab.py --a /path/to/old/checkout --b . [--rounds 5] [--calls 20000]

Each round starts one fresh process per checkout (``PYTHONPATH`` set to it), in alternating order, so
both see the same machine load. A process ingests the shipped sample corpus (``examples/sample_docs``)
with the cache on (L1 + L3, no Redis), asks 20 distinct questions once (misses), then times ``ask_body``
for those questions round-robin ``--calls`` times: every call is an L1 exact hit, the hot path of
DESIGN.md §2. Reports, per checkout, the median over rounds of each round's p50 and p99 (µs), and the
ratio b/a of the medians. Works with any checkout whose ``AsyncRAG.ask_body`` takes a query string.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import asyncio, json, sys, tempfile, time
from pathlib import Path
from ragline import AsyncRAG, Settings

QUESTIONS = [
    "What does reciprocal rank fusion do?", "What is BM25?", "How does HNSW work?", "What is MMR?",
    "Why cache embeddings?", "What is a token budget?", "How is the context packed?", "What is single-flight?",
    "What is a dense retriever?", "What is a keyword retriever?", "How are chunks made?", "What is dedupe?",
    "What is a semantic cache?", "What is an exact cache hit?", "What is tenant isolation?", "What is L1?",
    "What is L2?", "What is L3?", "What does fail open mean?", "What is a circuit breaker?",
]

async def main(docs: str, calls: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        s = Settings(data_dir=Path(tmp), cache={"enabled": True, "redis_url": None})
        async with AsyncRAG(s) as rag:
            await rag.ingest_paths([docs])
            for q in QUESTIONS:
                await rag.ask_body(q)
            for q in QUESTIONS:  # warm: every one an L1 hit from here on
                _, info = await rag.ask_body(q)
                assert info.kind == "exact", info
            lat = []
            pc = time.perf_counter_ns
            n = len(QUESTIONS)
            for i in range(calls):
                q = QUESTIONS[i % n]
                t0 = pc()
                await rag.ask_body(q)
                lat.append(pc() - t0)
            lat.sort()
            print(json.dumps({"p50_us": lat[len(lat) // 2] / 1000, "p99_us": lat[int(len(lat) * 0.99)] / 1000}))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def run_one(tree: Path, docs: Path, calls: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(docs), str(calls)], env=env, check=True,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", type=Path, required=True, help="baseline checkout")
    ap.add_argument("--b", type=Path, default=here.parent, help="checkout under test (default: this one)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if a.rounds < 1 or a.calls < 100:
        sys.exit("--rounds must be >= 1 and --calls >= 100")
    docs = here.parent / "examples" / "sample_docs"
    runs: dict[str, list[dict[str, float]]] = {"a": [], "b": []}
    for r in range(a.rounds):
        order = ("a", "b") if r % 2 == 0 else ("b", "a")
        for name in order:
            res = run_one(getattr(a, name).resolve(), docs, a.calls)
            runs[name].append(res)
            print(f"round {r + 1} {name}: {res}", flush=True)
    report: dict[str, object] = {"a": str(a.a.resolve()), "b": str(a.b.resolve()), "rounds": a.rounds,
                                 "calls": a.calls, "runs": runs}  # fmt: skip
    for name in ("a", "b"):
        report[f"{name}_p50_us_median"] = round(statistics.median(x["p50_us"] for x in runs[name]), 3)
        report[f"{name}_p99_us_median"] = round(statistics.median(x["p99_us"] for x in runs[name]), 3)
    report["p50_ratio_b_over_a"] = round(float(report["b_p50_us_median"]) / float(report["a_p50_us_median"]), 3)  # type: ignore[arg-type]
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
