"""Per-call overhead of the gateway over a direct client call to the same fake upstream.

    python benchmarks/gateway_overhead.py [--rounds 5] [--calls 500] [--warmup 200] [--fake process|thread]
        [--loop asyncio|uvloop] [--no-stream] [--profile]

Evidence for: "gateway p50 overhead over a direct client call to the same fake upstream ≤ 2 ms
(LiteLLM documents 3.25 ms for its proxy)."

Setup.  The fake OpenAI upstream (``python -m ragline.testing.fake_upstream``) runs in its own
process by default (``--fake thread`` serves it from a thread of this process instead, where its
request handling shares the GIL with the client being measured), with ``latency_ms = 0`` and no
concurrency bound, so a call's time is the client + HTTP + the fake's few tens of microseconds.  A
``redis-server`` (free port, ``--save "" --appendonly no``) is started for the shared-state variants.
Calls are sequential (one in flight), non-streaming ``complete`` of a short RAG-style prompt
(a SciFact query, ``max_tokens=64``):

* ``direct``: ``OpenAILLM(LLMSettings(provider="openai", base_url=fake, model="m", retries=0))``;
* ``gateway_local``: ``GatewayLLM`` with that one upstream, default strategy (``least_busy``), and
  ``LocalState`` (in-process admission);
* ``gateway_redis``: the same with ``RedisState`` (admission/settle Lua scripts in Redis);
* ``gateway_redis_round_robin``: one upstream, ``round_robin``, Redis: isolates the in-flight count
  read that ``least_busy`` does before admission;
* ``gateway_redis_least_busy_3``: ``least_busy`` over 3 upstreams (names a, b, c; all the same
  fake, each its own connection pool) + Redis;
* streaming (unless ``--no-stream``): ``direct_stream`` / ``gateway_local_stream`` / ``gateway_redis_stream``,
  the time to consume the whole SSE stream.

Each variant gets ``--warmup`` calls first; then ``--rounds`` rounds, each running ``--calls``
sequential calls per variant, the variant order rotating every round.  Reported per variant: the
median across rounds of each round's p50/p90/p99 (ms), the client CPU per call, the p50 difference
versus ``direct`` (``direct_stream`` for the stream variants), and for Redis variants the Redis
commands per call (``INFO commandstats`` deltas).  The claim is checked on the non-streaming
variants.  ``--profile`` (or any p50 overhead above 2 ms) adds a cProfile of the gateway variants:
the functions of ``ragline/gateway`` and ``ragline/llm/gateway.py`` and the heaviest callees.

Writes ``benchmarks/results/gateway_overhead.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from _common import DATA, RESULTS
from _fake import fake_upstream, redis_server

from ragline.config import GatewaySettings, LLMSettings, UpstreamSettings
from ragline.gateway.redis_state import RedisState
from ragline.gateway.state import LocalState
from ragline.llm.base import GenParams
from ragline.llm.gateway import GatewayLLM
from ragline.llm.openai import OpenAILLM

CLAIM_MS = 2.0
SUMMARY = (  # (label, file suffix, function): the profile's compact view (cumulative CPU per call, µs)
    ("GatewayLLM.complete", "ragline/llm/gateway.py", "complete"),
    ("Gateway.call", "ragline/gateway/core.py", "call"),
    ("Gateway._admit", "ragline/gateway/core.py", "_admit"),
    ("Gateway.settle", "ragline/gateway/core.py", "settle"),
    ("RedisState.in_flight", "ragline/gateway/redis_state.py", "in_flight"),
    ("RedisState.acquire", "ragline/gateway/redis_state.py", "acquire"),
    ("RedisState.settle", "ragline/gateway/redis_state.py", "settle"),
    ("OpenAILLM.complete (the wire call)", "ragline/llm/openai.py", "complete"),
    ("tenacity AsyncRetrying.__anext__", "tenacity/asyncio/__init__.py", "__anext__"),
    ("tenacity AsyncRetrying.__init__", "tenacity/asyncio/__init__.py", "__init__"),
    ("uuid4", "uuid.py", "uuid4"),
    ("asyncio.shield", "asyncio/tasks.py", "shield"),
)


def load_questions(n: int = 200) -> list[str]:
    out = []
    for raw in (DATA / "scifact" / "queries.jsonl").read_bytes().splitlines()[:n]:
        if raw.strip():
            out.append(str(orjson.loads(raw)["text"]))
    return out


def messages_for(q: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "Answer using only the numbered sources; cite them like [1]."},
        {"role": "user", "content": f"Sources:\n[1] A short passage about the topic.\n\nQuestion: {q}"},
    ]


def build(name: str, url: str, redis_url: str | None) -> Any:
    if name.startswith("direct"):
        return OpenAILLM(LLMSettings(provider="openai", base_url=url, model="m", retries=0))
    if "least_busy_3" in name:
        ups = tuple(UpstreamSettings(base_url=url, model="m", name=n) for n in ("a", "b", "c"))
        strategy = "least_busy"
    else:
        ups = (UpstreamSettings(base_url=url, model="m"),)
        strategy = "round_robin" if "round_robin" in name else "least_busy"
    settings = LLMSettings(provider="gateway", model="m", gateway=GatewaySettings(upstreams=ups, strategy=strategy))
    if "redis" in name:
        assert redis_url is not None
        state: Any = RedisState(redis_url, prefix=f"bench:gw:{name}:")
    else:
        state = LocalState()
    return GatewayLLM(settings, state=state)


async def one_call(llm: Any, stream: bool, msgs: list[dict[str, str]], params: GenParams) -> int:
    if not stream:
        c = await llm.complete(msgs, params)
        return len(c.text)
    n = 0
    async for chunk in llm.stream(msgs, params):
        n += len(chunk.delta or "")
    return n


async def redis_commandstats(redis_url: str | None) -> dict[str, int]:
    if redis_url is None:
        return {}
    from redis.asyncio import Redis

    r = Redis.from_url(redis_url)
    try:
        info = await r.info("commandstats")
    finally:
        await r.aclose()
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


async def redis_ping_ms(redis_url: str, n: int = 500) -> dict[str, float]:
    from redis.asyncio import Redis

    r = Redis.from_url(redis_url)
    ts = []
    try:
        for _ in range(50):
            await r.ping()
        for _ in range(n):
            t0 = time.perf_counter()
            await r.ping()
            ts.append(time.perf_counter() - t0)
    finally:
        await r.aclose()
    a = np.asarray(ts) * 1000
    return {"p50_ms": round(float(np.percentile(a, 50)), 4), "p99_ms": round(float(np.percentile(a, 99)), 4)}


def pct(ts: list[float]) -> dict[str, float]:
    a = np.asarray(ts) * 1000
    return {f"p{p}_ms": float(np.percentile(a, p)) for p in (50, 90, 99)}


def profile_variant(
    llm: Any, stream: bool, qs: list[str], params: GenParams, calls: int, loop: asyncio.AbstractEventLoop
) -> dict[str, Any]:
    """cProfile of ``calls`` sequential calls: the gateway's own functions and the heaviest overall."""

    async def go() -> None:
        for i in range(calls):
            await one_call(llm, stream, messages_for(qs[i % len(qs)]), params)

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    loop.run_until_complete(go())
    prof.disable()
    wall = time.perf_counter() - t0
    st = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, func), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "function": f"{Path(file).name}:{line}:{func}",
                "file": file,
                "calls_per_call": round(nc / calls, 2),
                "tottime_us_per_call": round(tt / calls * 1e6, 1),
                "cumtime_us_per_call": round(ct / calls * 1e6, 1),
            }
        )
    ours = [
        r
        for r in rows
        if "/ragline/gateway/" in r["file"] or r["file"].endswith("ragline/llm/gateway.py") or "/tenacity/" in r["file"]
    ]
    ours.sort(key=lambda r: -r["cumtime_us_per_call"])
    summary: dict[str, float] = {}
    for label, suffix, func in SUMMARY:
        hits = [r for r in rows if r["file"].endswith(suffix) and r["function"].endswith(":" + func)]
        if hits:
            summary[label] = max(r["cumtime_us_per_call"] for r in hits)
    top_tot = sorted(rows, key=lambda r: -r["tottime_us_per_call"])[:25]
    for r in (*ours, *top_tot):
        r.pop("file", None)
    return {
        "calls": calls,
        "wall_ms_per_call_under_profiler": round(wall / calls * 1000, 3),
        "summary_cumtime_us_per_call": summary,
        "gateway_and_tenacity_by_cumtime": ours[:30],
        "top_by_tottime": top_tot,
    }


async def run_rounds(
    a: argparse.Namespace, variants: list[str], llms: dict[str, Any], redis_url: str | None, qs: list[str]
) -> dict[str, Any]:
    params = GenParams(model="m", max_tokens=64)
    per_round: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    cmds: dict[str, dict[str, int]] = {v: {} for v in variants}
    upstream_used: dict[str, dict[str, int]] = {v: {} for v in variants}
    for v in variants:  # warm-up: connections, Lua scripts loaded, code paths hot
        for i in range(a.warmup):
            await one_call(llms[v], v.endswith("stream"), messages_for(qs[i % len(qs)]), params)
    k = 0
    for r in range(a.rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            llm, stream = llms[v], v.endswith("stream")
            before = await redis_commandstats(redis_url) if "redis" in v else {}
            ts = []
            c0 = time.process_time()
            for _ in range(a.calls):
                msgs = messages_for(qs[k % len(qs)])
                k += 1
                t0 = time.perf_counter()
                if stream:
                    await one_call(llm, True, msgs, params)
                else:
                    c = await llm.complete(msgs, params)
                    if c.upstream:
                        upstream_used[v][c.upstream] = upstream_used[v].get(c.upstream, 0) + 1
                ts.append(time.perf_counter() - t0)
            cpu[v].append((time.process_time() - c0) / a.calls)
            if "redis" in v:
                after = await redis_commandstats(redis_url)
                for name, n in after.items():
                    d = n - before.get(name, 0)
                    if name not in ("info",) and d:
                        cmds[v][name] = cmds[v].get(name, 0) + d
            per_round[v].append(pct(ts))
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{v} {per_round[v][-1]['p50_ms']:.3f}" for v in variants))
    out: dict[str, Any] = {}
    for v in variants:
        rows = per_round[v]
        out[v] = {
            **{key: round(statistics.median(row[key] for row in rows), 4) for key in ("p50_ms", "p90_ms", "p99_ms")},
            "p50_ms_per_round": [round(row["p50_ms"], 4) for row in rows],
            "cpu_ms_per_call": round(statistics.median(cpu[v]) * 1000, 4),
            "calls": a.calls * a.rounds,
        }
        if cmds[v]:
            out[v]["redis_commands_per_call"] = {
                name: round(n / (a.calls * a.rounds), 3) for name, n in sorted(cmds[v].items())
            }
        if upstream_used[v]:
            out[v]["answered_by"] = upstream_used[v]
    for v in variants:
        base = "direct_stream" if v.endswith("stream") else "direct"
        if v != base and base in out:
            out[v]["p50_overhead_ms"] = round(out[v]["p50_ms"] - out[base]["p50_ms"], 4)
            out[v]["p50_overhead_ms_per_round"] = [
                round(x - y, 4) for x, y in zip(out[v]["p50_ms_per_round"], out[base]["p50_ms_per_round"], strict=True)
            ]
            out[v]["cpu_overhead_ms_per_call"] = round(out[v]["cpu_ms_per_call"] - out[base]["cpu_ms_per_call"], 4)
    return out


def run(a: argparse.Namespace) -> dict[str, Any]:
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if a.loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    variants = [
        "direct",
        "gateway_local",
        "gateway_redis",
        "gateway_redis_round_robin",
        "gateway_redis_least_busy_3",
    ]
    if not a.no_stream:
        variants += ["direct_stream", "gateway_local_stream", "gateway_redis_stream"]
    qs = load_questions()
    results: dict[str, Any] = {
        "benchmark": "gateway_overhead",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
        "params": {
            "rounds": a.rounds,
            "calls_per_round": a.calls,
            "warmup": a.warmup,
            "fake": a.fake,
            "loop": a.loop,
            "fake_latency_ms": 0,
        },
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ragline-overhead-")))
        fake = stack.enter_context(fake_upstream(a.fake, tmp))
        fake.configure(latency_ms=0, concurrency=0, tps=0)
        redis_url = stack.enter_context(redis_server(tmp))
        loop = loop_factory()
        stack.callback(loop.close)
        llms = {v: build(v, fake.url, redis_url) for v in variants}
        try:
            results["redis_ping"] = loop.run_until_complete(redis_ping_ms(redis_url))
            before = fake.route_calls("chat")
            results["variants"] = loop.run_until_complete(run_rounds(a, variants, llms, redis_url, qs))
            results["chat_calls_at_fake"] = fake.route_calls("chat") - before
            results["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
            overheads = {
                v: r["p50_overhead_ms"]
                for v, r in results["variants"].items()
                if "p50_overhead_ms" in r and not v.endswith("stream")
            }
            results["claim"] = {
                "statement": f"gateway p50 overhead over a direct client call <= {CLAIM_MS} ms",
                "p50_overhead_ms": overheads,
                "holds": all(x <= CLAIM_MS for x in overheads.values()),
                "worst": max(overheads, key=lambda v: overheads[v]),
            }
            if a.profile or not results["claim"]["holds"]:
                params = GenParams(model="m", max_tokens=64)
                results["profile"] = {
                    v: profile_variant(llms[v], False, qs, params, a.profile_calls, loop)
                    for v in ("direct", "gateway_local", "gateway_redis_least_busy_3")
                }
        finally:
            for llm in llms.values():
                loop.run_until_complete(llm.aclose())
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=500, help="sequential calls per variant per round")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--fake", choices=("process", "thread"), default="process")
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    ap.add_argument("--no-stream", action="store_true")
    ap.add_argument("--profile", action="store_true", help="always add the cProfile section")
    ap.add_argument("--profile-calls", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=RESULTS / "gateway_overhead.json")
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    results = run(a)
    results["elapsed_s"] = round(time.monotonic() - t0, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    for v, r in results["variants"].items():
        extra = f"  overhead {r['p50_overhead_ms']:+.3f} ms" if "p50_overhead_ms" in r else ""
        print(
            f"{v:>28}: p50 {r['p50_ms']:.3f}  p90 {r['p90_ms']:.3f}  p99 {r['p99_ms']:.3f} ms  "
            f"cpu {r['cpu_ms_per_call']:.3f} ms{extra}"
        )
    print(f"claim holds: {results['claim']['holds']} {results['claim']['p50_overhead_ms']}; wrote {a.out}")


if __name__ == "__main__":
    main()
