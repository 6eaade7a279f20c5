"""What a refusal costs at capacity: shed before routing vs refused inside the pipeline, against an exact hit.

    python benchmarks/shed_cost.py [--rounds 7] [--n 1000]

In process, over raw ASGI (no sockets, no uvicorn: what the app itself spends), with the test doubles
for the model (the refused requests never reach it) and one SciFact document and query.  Admission is
held full (one slot, held; no queue).  Three requests, interleaved rounds, CPU µs per request (process
time, robust to other load on the machine), medians:

* ``hit``: the query asked before: an exact cache hit (never shed);
* ``refused_in_pipeline``: a new query with ``cache: bypass``, the shedder switched off: routing, the
  endpoint, query validation, ``Admission.slot`` raising ``AtCapacity`` and the exception handler;
* ``shed_early``: the same request, refused by :class:`ragline.server.shedding.Shedder` in the guard.

Writes ``benchmarks/results/shed_cost.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from _asgi import AsgiDriver
from _common import DATA, RESULTS

from ragline.config import Settings
from ragline.pipeline import AsyncRAG
from ragline.server.app import create_app
from ragline.server.shedding import Shedder
from ragline.testing import HashEmbedder, ScriptedLLM
from ragline.types import Document


async def run(a: argparse.Namespace) -> dict[str, Any]:
    doc = orjson.loads((DATA / "scifact" / "corpus.jsonl").read_bytes().splitlines()[0])
    query = orjson.loads((DATA / "scifact" / "queries.jsonl").read_bytes().splitlines()[0])["text"]
    with tempfile.TemporaryDirectory() as t:
        s = Settings(
            data_dir=Path(t) / "d",
            cache={"enabled": True, "redis_url": None, "semantic": False},
            limits={"max_concurrent_work": 1, "max_queued_work": 0},
        )
        rag = AsyncRAG(s, embedder=HashEmbedder(), llm=ScriptedLLM())
        app = create_app(s, rag)
        async with app.router.lifespan_context(app):
            await rag.ingest([Document(doc["_id"], doc["text"], doc.get("title", ""))])
            hit = AsgiDriver(app, "POST", "/v1/query", orjson.dumps({"query": query}))
            miss = AsgiDriver(app, "POST", "/v1/query", orjson.dumps({"query": query + " (new)", "cache": "bypass"}))
            assert (await hit())[0] == 200
            hold = asyncio.Event()

            async def holder() -> None:
                async with rag.admission.slot():
                    await hold.wait()

            h = asyncio.ensure_future(holder())
            await asyncio.sleep(0)
            shed = Shedder.should_shed
            res: dict[str, list[float]] = {"hit": [], "refused_in_pipeline": [], "shed_early": []}
            try:
                for _ in range(a.rounds):
                    for name in res:
                        Shedder.should_shed = (lambda *_: False) if name == "refused_in_pipeline" else shed  # type: ignore[method-assign]
                        driver, want = (hit, 200) if name == "hit" else (miss, 503)
                        c0 = time.process_time()
                        for _ in range(a.n):
                            status, _body = await driver()
                            assert status == want, status
                        res[name].append((time.process_time() - c0) / a.n * 1e6)
            finally:
                Shedder.should_shed = shed  # type: ignore[method-assign]
                hold.set()
                await h
    med = {k: round(statistics.median(v), 1) for k, v in res.items()}
    return {
        "rounds": a.rounds,
        "n": a.n,
        "cpu_us_per_request": med,
        "refused_in_pipeline_over_hit": round(med["refused_in_pipeline"] / med["hit"], 2),
        "shed_early_over_hit": round(med["shed_early"] / med["hit"], 2),
        "refused_in_pipeline_over_shed_early": round(med["refused_in_pipeline"] / med["shed_early"], 2),
        "note": "raw ASGI, no uvicorn: the HTTP parsing and socket work every request costs come on top",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n", type=int, default=1000)
    a = ap.parse_args()
    report = asyncio.run(run(a))
    (RESULTS / "shed_cost.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
