"""Gateway routing: latency under a slow upstream, and spread over equal upstreams (issue 9).

    HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false .venv/bin/python benchmarks/gateway_routing.py \
        [--rounds 3] [--requests 600] [--concurrency 16] [--latency-ms 40] [--slow-factor 5] \
        [--spread-requests 1000] [--docs 200] [--no-redis]

Evidence for: "with one upstream 5x slower than two others, least-busy and latency-based routing give
p95 latency <= 0.7x round-robin's in the same run; with equal upstreams, least-busy spreads within
+-10% across them over 1,000 requests, including while half the requests are cache hits."

**Part A (slow upstream).** Three in-process ``ragline.testing.FakeUpstream`` servers on 127.0.0.1, two
answering after ``--latency-ms`` (40 ms) and one after ``--slow-factor`` times that (200 ms), form one
group of a ``GatewayLLM`` (``llm.provider: gateway``, no limits, retries 2, default breaker). For every
strategy (round_robin, least_busy, latency, weighted, random) a fresh ``GatewayLLM`` serves
``--requests`` chat completions at a fixed ``--concurrency`` (closed loop: each worker sends its next
request when the previous one returned). Rounds are interleaved (round 1: every strategy, round 2:
every strategy, ...; the order rotates each round) so all strategies see the same machine load.
Reported per strategy: the median over rounds of p50/p90/p95/p99 of client latency, the share of
requests the slow upstream served (counted at the fakes), and the ratio of p50/p95 to round_robin's
in the same round (median over rounds). ``expected_slow_share`` is what an ideal strategy of each kind
would send to the slow upstream: 1/3 (round robin, random, weighted with equal weights), 1/11
(least busy: equal in-flight counts give each upstream a share proportional to 1/latency) and ~0
(latency).

**Part B (equal upstreams, half cache hits).** Three equal fakes (``--latency-ms`` each), least_busy,
behind the real pipeline: ``AsyncRAG`` with the default local embedder (MiniLM, offline) over the first
``--docs`` SciFact documents (ingested into a temporary data_dir), the answer cache on (default
settings). ``--spread-requests`` queries are asked at ``--concurrency 8``: the first half are distinct
SciFact queries, the second half repeats of those (exact-answer cache hits), shuffled together so that
each repeat comes after its first asking in the stream (a repeat still in flight is joined by
single-flight, also no upstream call). Calls are counted at each fake; reported: each one's share, the
max deviation from the mean (the claim: within +-10%), and the cache hits by kind. Run twice: with
in-process gateway state, and (unless ``--no-redis``) with a ``redis-server`` the benchmark starts on a
free port, as ``cache.redis_url`` (so the gateway's in-flight counts live in Redis, ``RedisState``).

Writes ``benchmarks/results/gateway_routing.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from _common import DATA, RESULTS, free_port, process

from ragline.config import CacheSettings, GatewaySettings, LLMSettings, Settings, UpstreamSettings
from ragline.llm.base import GenParams
from ragline.llm.gateway import GatewayLLM
from ragline.pipeline import AsyncRAG
from ragline.testing import FakeUpstream
from ragline.types import Document

STRATEGIES = ("round_robin", "least_busy", "latency", "weighted", "random")
NAMES = ("fast-a", "fast-b", "slow")


def pcts(seconds: list[float]) -> dict[str, float]:
    a = np.asarray(seconds) * 1000.0
    return {f"p{q}_ms": round(float(np.percentile(a, q)), 2) for q in (50, 90, 95, 99)}


def gateway_settings(fakes: dict[str, FakeUpstream], strategy: str, **extra: Any) -> LLMSettings:
    ups = tuple(UpstreamSettings(base_url=f.url, model="chat", name=n, timeout_s=10.0) for n, f in fakes.items())
    return LLMSettings(
        provider="gateway",
        model="chat",
        max_tokens=64,
        gateway=GatewaySettings(upstreams=ups, strategy=strategy, **extra),
    )


# --------------------------------------------------------------------------------------- part A
async def run_strategy(
    fakes: dict[str, FakeUpstream], strategy: str, n: int, conc: int, slow_s: float = 0.2
) -> dict[str, Any]:
    for f in fakes.values():
        f.reset()
    llm = GatewayLLM(gateway_settings(fakes, strategy))
    params = GenParams(model="chat", max_tokens=64)
    lat: list[float] = []
    errors = 0
    it = iter(range(n))

    async def worker() -> None:
        nonlocal errors
        for i in it:
            msgs = [{"role": "user", "content": f"Question: routing probe {i}"}]
            t0 = time.perf_counter()
            try:
                await llm.complete(msgs, params)  # type: ignore[arg-type]
            except Exception:
                errors += 1
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    wall = time.perf_counter() - t0
    snap = await llm.upstreams()
    await llm.aclose()
    calls = {name: f.route_calls("chat") for name, f in fakes.items()}
    total = sum(calls.values()) or 1
    slow_t = [a[0] for a in fakes["slow"].arrivals()]
    # calls the slow upstream received before its first reply could have come back (before any sample of it)
    blind = sum(1 for t in slow_t if t < slow_t[0] + slow_s) if slow_t else 0
    return {
        **pcts(lat),
        "errors": errors,
        "wall_s": round(wall, 2),
        "calls": calls,
        "slow_share": round(calls["slow"] / total, 4),
        "slow_calls_before_its_first_reply": blind,
        "ewma_ms": {r["name"]: r["latency_ms"] for r in snap["upstreams"]},
    }


async def part_a(rounds: int, n: int, conc: int, latency_ms: float, slow_factor: float) -> dict[str, Any]:
    lat = {"fast-a": latency_ms, "fast-b": latency_ms, "slow": latency_ms * slow_factor}
    with contextlib.ExitStack() as stack:
        fakes = {
            name: stack.enter_context(FakeUpstream(latency_ms=ms, seed=i)) for i, (name, ms) in enumerate(lat.items())
        }
        await run_strategy(fakes, "round_robin", 50, conc)  # warm-up (imports, connections), not reported
        per: dict[str, list[dict[str, Any]]] = {s: [] for s in STRATEGIES}
        for r in range(rounds):
            order = STRATEGIES[r % len(STRATEGIES) :] + STRATEGIES[: r % len(STRATEGIES)]
            for s in order:
                res = await run_strategy(fakes, s, n, conc, lat["slow"] / 1000)
                per[s].append(res)
                print(f"  A round {r + 1} {s:12s} p50 {res['p50_ms']:7.1f}  p95 {res['p95_ms']:7.1f} ms  "
                      f"slow share {res['slow_share']:.3f}  {res['wall_s']} s", flush=True)  # fmt: skip
    ideal_lb = (1 / slow_factor) / (2 + 1 / slow_factor)
    expected = {"round_robin": 1 / 3, "random": 1 / 3, "weighted": 1 / 3, "least_busy": ideal_lb, "latency": 0.0}
    out: dict[str, Any] = {}
    for s in STRATEGIES:
        runs = per[s]
        med = {k: round(statistics.median(x[k] for x in runs), 2) for k in ("p50_ms", "p90_ms", "p95_ms", "p99_ms")}
        ratio = {
            f"{k}_vs_round_robin": round(
                statistics.median(x[k] / rr[k] for x, rr in zip(runs, per["round_robin"], strict=True)), 3
            )
            for k in ("p50_ms", "p95_ms")
        }
        out[s] = {
            **med,
            **ratio,
            "slow_share": round(statistics.median(x["slow_share"] for x in runs), 4),
            "slow_calls_before_its_first_reply": [x["slow_calls_before_its_first_reply"] for x in runs],
            "expected_slow_share": round(expected[s], 4),
            "errors": sum(x["errors"] for x in runs),
            "rounds": runs,
        }
    for s in ("least_busy", "latency"):
        out[s]["claim_p95_le_0.7x_round_robin"] = out[s]["p95_ms_vs_round_robin"] <= 0.7
    return out


# --------------------------------------------------------------------------------------- part B
def scifact(n_docs: int, n_queries: int) -> tuple[list[Document], list[str]]:
    folder = DATA / "scifact"
    docs: list[Document] = []
    with (folder / "corpus.jsonl").open("rb") as fh:
        for raw in fh:
            d = orjson.loads(raw)
            docs.append(Document(id=str(d["_id"]), text=d["text"], title=d.get("title", "")))
            if len(docs) >= n_docs:
                break
    seen: dict[str, None] = {}
    with (folder / "queries.jsonl").open("rb") as fh:
        for raw in fh:
            seen.setdefault(orjson.loads(raw)["text"].strip(), None)
            if len(seen) >= n_queries:
                break
    return docs, list(seen)


def with_repeats(queries: list[str], lag: int, seed: int = 0) -> list[str]:
    """Each query twice; new and repeat alternate once repeats are due. A repeat is of a random
    query first asked more than ``lag`` requests earlier (at a concurrency well below ``lag`` it has
    been answered by then: an exact hit, not a single-flight join)."""
    rng = random.Random(seed)
    out: list[str] = []
    pending: list[tuple[int, str]] = []  # (position first asked, query), not repeated yet
    for q in queries:
        out.append(q)
        pending.append((len(out) - 1, q))
        ready = [i for i, (pos, _) in enumerate(pending) if len(out) - pos > lag]
        if ready:
            out.append(pending.pop(rng.choice(ready))[1])
    out.extend(q for _, q in pending)  # the last few, oldest first
    return out


@contextlib.contextmanager
def redis_server(tmp: Path) -> Iterator[str]:
    port = free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with process(cmd, {}, tmp / "redis.log"):
        import redis

        r = redis.Redis(host="127.0.0.1", port=port)
        for _ in range(100):
            with contextlib.suppress(redis.RedisError):
                if r.ping():
                    break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"


async def part_b_run(
    data_dir: Path, docs: list[Document] | None, stream: list[str], latency_ms: float, conc: int, redis_url: str | None
) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        fakes = {f"eq-{i}": stack.enter_context(FakeUpstream(latency_ms=latency_ms, seed=i)) for i in range(3)}
        settings = Settings(
            data_dir=data_dir,
            llm=gateway_settings(fakes, "least_busy"),
            cache=CacheSettings(redis_url=redis_url),
        )
        async with AsyncRAG(settings) as rag:
            if docs:
                await rag.ingest(docs)
            state = rag.llm.gateway.state.mode  # type: ignore[attr-defined]
            kinds: Counter[str] = Counter()
            errors = 0
            lat: list[float] = []
            it = iter(stream)

            async def worker() -> None:
                nonlocal errors
                for q in it:
                    t0 = time.perf_counter()
                    try:
                        a = await rag.ask(q)
                        kinds[a.cache.kind] += 1
                    except Exception:
                        errors += 1
                    lat.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(conc)))
            wall = time.perf_counter() - t0
            snap = await rag.upstreams()
        calls = {n: f.route_calls("chat") for n, f in fakes.items()}
    total = sum(calls.values())
    mean = total / len(calls)
    dev = max(abs(c - mean) / mean for c in calls.values()) if mean else 0.0
    return {
        "gateway_state": state,
        "requests": len(stream),
        "errors": errors,
        "wall_s": round(wall, 2),
        "cache": dict(kinds),
        "cache_hits": sum(v for k, v in kinds.items() if k != "miss"),
        "upstream_calls": calls,
        "upstream_calls_total": total,
        "requests_answered_without_upstream": len(stream) - total,
        "share": {n: round(c / total, 4) for n, c in calls.items()} if total else {},
        "max_deviation_from_mean": round(dev, 4),
        "claim_within_10pct": dev <= 0.10,
        "latency": pcts(lat),
        "gateway_requests": {u["name"]: u["requests"] for u in snap["llm"]["upstreams"]},
    }


async def part_b(n_docs: int, n_req: int, latency_ms: float, conc: int, use_redis: bool) -> dict[str, Any]:
    docs, queries = scifact(n_docs, n_req // 2)
    stream = with_repeats(queries, lag=4 * conc)
    out: dict[str, Any] = {"docs": len(docs), "distinct_queries": len(queries), "concurrency": conc}
    with tempfile.TemporaryDirectory(prefix="ragline-gwroute-") as t:
        tmp = Path(t)
        t0 = time.perf_counter()
        out["local"] = await part_b_run(tmp / "data", docs, stream, latency_ms, conc, None)
        out["local"]["wall_incl_ingest_s"] = round(time.perf_counter() - t0, 2)
        print(f"  B local: {out['local']['upstream_calls']} dev {out['local']['max_deviation_from_mean']:.3f} "
              f"cache {out['local']['cache']}", flush=True)  # fmt: skip
        if use_redis:
            if shutil.which("redis-server") is None:
                out["redis"] = {"skipped": "redis-server not found"}
            else:
                with redis_server(tmp) as url:
                    # a fresh answer cache (new Redis, L1/L3 are per data_dir: copy the store, not the cache)
                    shutil.copytree(tmp / "data", tmp / "data2", ignore=shutil.ignore_patterns("cache*"))
                    out["redis"] = await part_b_run(tmp / "data2", None, stream, latency_ms, conc, url)
                rb = out["redis"]
                print(f"  B redis: {rb['upstream_calls']} dev {rb['max_deviation_from_mean']:.3f} cache {rb['cache']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=600, help="part A requests per strategy per round")
    ap.add_argument("--concurrency", type=int, default=16, help="part A concurrency")
    ap.add_argument("--latency-ms", type=float, default=40.0)
    ap.add_argument("--slow-factor", type=float, default=5.0)
    ap.add_argument("--spread-requests", type=int, default=1000, help="part B requests (half cache hits)")
    ap.add_argument("--spread-concurrency", type=int, default=8)
    ap.add_argument("--docs", type=int, default=200, help="part B: SciFact documents ingested")
    ap.add_argument("--no-redis", action="store_true", help="part B: skip the run with Redis-shared state")
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--skip-b", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "gateway_routing.json")
    a = ap.parse_args()
    if a.rounds < 1 or a.requests < 20 or a.spread_requests < 10:
        sys.exit("--rounds >= 1, --requests >= 20, --spread-requests >= 10")
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "config": {k: v for k, v in vars(a).items() if k != "out"},
        "command": " ".join(["python", *sys.argv]),
    }
    if not a.skip_a:
        print("part A: one upstream slower than two others", flush=True)
        result["slow_upstream"] = asyncio.run(part_a(a.rounds, a.requests, a.concurrency, a.latency_ms, a.slow_factor))
    if not a.skip_b:
        print("part B: equal upstreams, least_busy, half cache hits", flush=True)
        result["spread"] = asyncio.run(
            part_b(a.docs, a.spread_requests, a.latency_ms, a.spread_concurrency, not a.no_redis)
        )
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    summary = {s: {k: v for k, v in r.items() if k != "rounds"} for s, r in result.get("slow_upstream", {}).items()}
    print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    print(f"wrote {a.out} in {result['wall_s']} s")


if __name__ == "__main__":
    main()
