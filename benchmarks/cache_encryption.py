"""Exact-hit latency with encryption at rest on vs off, in one run (issue 10, evidence 6).

    python benchmarks/cache_encryption.py [--docs 1000] [--queries 300] [--rounds 9]

Starts its own redis-server on 127.0.0.1 (no persistence). Four in-process pipelines, each on its own
data dir, ingest the same first ``--docs`` SciFact documents (``../shared/data/scifact``):

* ``l2``: L1 off, L2 (Redis; its own database number per pipeline) and L3 on: every exact hit is
  served from L2;
* ``l3``: L1 and L2 off, L3 on: every exact hit is served from L3 (diskcache on SQLite);

each with ``cache.encryption_key`` set (``on``) and unset (``off``). To keep it fast and isolate the
cache, the embedder is ``ragline.testing.HashEmbedder`` (no model) and the LLM is the extractive one
(the default). Each pipeline asks the first ``--queries`` SciFact queries once (misses, stored),
checks that a second pass is all exact hits from the intended tier, then ``--rounds`` rounds time
one pass each of ``AsyncRAG.ask`` and of ``AsyncRAG.ask_body`` (the HTTP path's pre-serialised
body) over the queries, each query asked of the ``on`` and the ``off`` pipeline back to back (which
one first alternates per query and per round), so both see the same machine load. Reported per tier and call: the median
over rounds of each round's p50, the p99 of all calls, and the ratio on/off of the medians; plus the
codec's own cost (seal and open of the median stored answer body). Writes ``cache_encryption.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis
from _common import DATA, RESULTS, clean_env, free_port, process

from ragline.cache.crypto import ValueCipher
from ragline.config import Settings
from ragline.pipeline import AsyncRAG
from ragline.testing import HashEmbedder
from ragline.types import Document


@contextmanager
def redis_server(tmp: Path) -> Iterator[str]:
    port = free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with process(cmd, clean_env(), tmp / "redis.log") as proc:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((tmp / "redis.log").read_text()) from None
                time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}"


def load(n_docs: int, n_queries: int) -> tuple[list[Document], list[str]]:
    folder = DATA / "scifact"
    docs = []
    for line in (folder / "corpus.jsonl").read_bytes().splitlines()[:n_docs]:
        d = orjson.loads(line)
        docs.append(Document(str(d["_id"]), d["text"], title=d.get("title") or None))
    texts = [orjson.loads(line)["text"] for line in (folder / "queries.jsonl").read_bytes().splitlines()]
    return docs, list(dict.fromkeys(texts))[:n_queries]


def settings(data_dir: Path, tier: str, key: str | None, redis_url: str, db: int) -> Settings:
    cache: dict[str, Any] = {"enabled": True, "l1_enabled": False, "semantic": False}
    if tier == "l2":
        cache |= {"redis_url": f"{redis_url}/{db}", "pubsub_channel": f"bench-enc-{db}", "redis_timeout_s": 1.0}
    else:
        cache |= {"l2_enabled": False, "redis_url": None}
    if key is not None:
        cache["encryption_key"] = key
    return Settings(data_dir=data_dir, cache=cache)


async def timed(rag: AsyncRAG, q: str, tier: str, body: bool) -> float:
    """Latency in µs of one call, which must be an exact hit from ``tier``."""
    pc = time.perf_counter_ns
    if body:
        t0 = pc()
        _, info = await rag.ask_body(q)
        dt = pc() - t0
    else:
        t0 = pc()
        info = (await rag.ask(q)).cache
        dt = pc() - t0
    assert (info.kind, info.tier) == ("exact", tier), (q, info)
    return dt / 1000


async def paired_pass(
    on: AsyncRAG, off: AsyncRAG, queries: list[str], tier: str, body: bool, flip: int
) -> tuple[list[float], list[float]]:
    """Each query asked of both pipelines back to back, which one first alternating per query."""
    t_on: list[float] = []
    t_off: list[float] = []
    for i, q in enumerate(queries):
        if (i + flip) % 2 == 0:
            t_on.append(await timed(on, q, tier, body))
            t_off.append(await timed(off, q, tier, body))
        else:
            t_off.append(await timed(off, q, tier, body))
            t_on.append(await timed(on, q, tier, body))
    return t_on, t_off


def codec_cost(body: bytes, n: int = 20_000) -> dict[str, float]:
    c = ValueCipher([os.urandom(32)])
    key = "rl:v1:default:answer:" + "0" * 32
    sealed = c.seal(key, body)
    t0 = time.perf_counter()
    for _ in range(n):
        c.seal(key, body)
    t1 = time.perf_counter()
    for _ in range(n):
        c.open(key, sealed)
    t2 = time.perf_counter()
    return {
        "body_bytes": len(body),
        "sealed_bytes": len(sealed),
        "seal_us": round((t1 - t0) / n * 1e6, 2),
        "open_us": round((t2 - t1) / n * 1e6, 2),
    }


async def run(a: argparse.Namespace, tmp: Path, redis_url: str) -> dict[str, Any]:
    docs, queries = load(a.docs, a.queries)
    key = base64.urlsafe_b64encode(os.urandom(32)).decode()
    names = [(tier, mode) for tier in ("l2", "l3") for mode in ("on", "off")]
    rags: dict[tuple[str, str], AsyncRAG] = {}
    t_setup = time.perf_counter()
    for db, (tier, mode) in enumerate(names):
        s = settings(tmp / f"{tier}-{mode}", tier, key if mode == "on" else None, redis_url, db)
        rag = rags[(tier, mode)] = await AsyncRAG(s, embedder=HashEmbedder()).start()
        await rag.ingest(docs)
        for q in queries:
            assert (await rag.ask(q)).cache.kind == "miss"
        for q in queries:  # warm, and checks every call is a hit from `tier`
            await timed(rag, q, tier, body=False)
    setup_s = time.perf_counter() - t_setup
    bodies = sorted([(await rags[("l3", "off")].ask_body(q))[0] for q in queries], key=len)
    lat: dict[tuple[str, str, str], list[list[float]]] = {}
    for r in range(a.rounds):
        for tier in ("l2", "l3"):
            for call in ("ask", "ask_body"):
                gc.collect()
                t_on, t_off = await paired_pass(
                    rags[(tier, "on")], rags[(tier, "off")], queries, tier, call == "ask_body", r
                )
                lat.setdefault((tier, call, "on"), []).append(t_on)
                lat.setdefault((tier, call, "off"), []).append(t_off)
    stats = {}
    for (tier, mode), rag in rags.items():
        assert rag.cache is not None
        st = rag.cache.tiers.tier(tier).stats()  # type: ignore[union-attr]
        stats[f"{tier}_{mode}"] = {"undecryptable": st.get("undecryptable", 0)}
        await rag.aclose()
    results: dict[str, Any] = {}
    for tier in ("l2", "l3"):
        for call in ("ask", "ask_body"):
            row: dict[str, Any] = {}
            for mode in ("on", "off"):
                rounds = lat[(tier, call, mode)]
                p50s = [statistics.median(x) for x in rounds]
                every = np.concatenate([np.asarray(x) for x in rounds])
                row[mode] = {
                    "p50_us_median_of_rounds": round(statistics.median(p50s), 1),
                    "p50_us_per_round": [round(x, 1) for x in p50s],
                    "p99_us": round(float(np.percentile(every, 99)), 1),
                    "mean_us": round(float(every.mean()), 1),
                    "calls": int(every.size),
                }
            row["ratio_on_off_p50"] = round(
                row["on"]["p50_us_median_of_rounds"] / row["off"]["p50_us_median_of_rounds"], 3
            )
            row["added_us_p50"] = round(row["on"]["p50_us_median_of_rounds"] - row["off"]["p50_us_median_of_rounds"], 1)
            results[f"{tier}_{call}"] = row
    return {
        "benchmark": "cache_encryption",
        "command": " ".join(["python", "benchmarks/" + Path(__file__).name, *sys.argv[1:]]),
        "what": "in-process exact-hit latency served from L2 (Redis, L1 off) and from L3 (disk, L1 and L2 off), "
        "cache.encryption_key set (on) vs unset (off), same run, interleaved rounds",
        "setup": {
            "corpus": f"first {len(docs)} SciFact documents",
            "queries": f"first {len(queries)} SciFact queries (queries.jsonl), each asked once before (stored)",
            "embedder": "ragline.testing.HashEmbedder (no model: isolates the cache path)",
            "llm": "extractive (default)",
            "rounds": a.rounds,
            "redis": "redis-server started by the benchmark on 127.0.0.1, no persistence",
            "setup_s": round(setup_s, 1),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        },
        "results": results,
        "codec": codec_cost(bodies[len(bodies) // 2]),
        "tier_stats": stats,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--docs", type=int, default=1000)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--out", type=Path, default=RESULTS / "cache_encryption.json")
    a = p.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("needs redis-server (Debian package redis-server)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="ragline-enc-") as t, redis_server(Path(t)) as url:
        out = asyncio.run(run(a, Path(t), url))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2) + b"\n")
    for name, row in out["results"].items():
        on, off = row["on"], row["off"]
        print(
            f"{name:12s} p50 on {on['p50_us_median_of_rounds']:8.1f} µs  off {off['p50_us_median_of_rounds']:8.1f} µs"
            f"  ratio {row['ratio_on_off_p50']:.3f}  (+{row['added_us_p50']:.1f} µs)   p99 on {on['p99_us']:.1f}"
            f" off {off['p99_us']:.1f}"
        )
    print("codec", out["codec"])


if __name__ == "__main__":
    main()
