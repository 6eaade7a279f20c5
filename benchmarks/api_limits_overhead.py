"""What the per-key and per-tenant request limits cost on the exact-hit hot path.

    python benchmarks/api_limits_overhead.py [--rounds 5] [--requests 2000]

In process, no sockets (``_asgi.AsgiDriver`` calls the ASGI app directly), sequential requests,
``HashEmbedder`` (no model).  Two measurements, each variant's rounds interleaved with the others:

* **middleware alone**: :class:`ragline.server.limits.RequestLimits` in front of an app that
  answers at once, versus that app alone: the limiter's own cost per request (header scan, two
  BLAKE2b hashes, the bucket step) with ``LocalState`` and with ``RedisState`` (one Lua call);
* **exact hit**: ``POST /v1/query`` answered from L1 by the full app, with limits off and on (per
  key and per tenant, rpm far above what the loop sends, so nothing is refused), without Redis and
  with ``cache.redis_url`` set (both the baseline and the limited app then have L2; an L1 hit never
  touches it, so the difference is the limiter's Lua call).

The Redis variants run exact (``rate_limit_sync_s: 0``, one Lua call per request) and synchronised
(``*_sync``: ``rate_limit_sync_s: 0.05``, admitted in process, one exchange with Redis per 50 ms).

Reported per variant: the median over rounds of the per-request CPU µs (process time) and of the
wall-clock p50 µs, and the overhead over the matching baseline.  All apps share one event loop, so
the CPU of the exact-hit variants includes the others' background tasks (cache metrics, the
invalidation subscriber): there the p50 is the better measure of the difference.  A
throw-away ``redis-server`` (free port, no persistence) is started for the Redis variants.
Writes ``benchmarks/results/api_limits_overhead.json``.
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
from _fake import redis_server

from ragline.config import Settings
from ragline.pipeline import AsyncRAG
from ragline.server.app import create_app
from ragline.server.auth import Auth
from ragline.server.limits import ApiLimits, RequestLimits
from ragline.testing import HashEmbedder
from ragline.types import Document

OUT = Path(__file__).parent / "results" / "api_limits_overhead.json"
KEY = "bench-key"
HUGE = 10**9  # rpm and burst: never refused


def settings(data_dir: Path, redis_url: str | None, limited: bool, sync_s: float = 0.0) -> Settings:
    server: dict[str, Any] = {"api_keys": {KEY: "bench"}, "rate_limit_sync_s": sync_s}
    if limited:
        server |= {"rate_limit_per_key_rpm": HUGE, "rate_limit_per_tenant_rpm": HUGE, "rate_limit_burst": HUGE}
    return Settings(
        data_dir=data_dir, cache={"enabled": True, "redis_url": redis_url, "semantic": False}, server=server
    )


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"ok":true}'})


def driver(app: Any, path: str, body: bytes = b"") -> AsgiDriver:
    d = AsgiDriver(app, "POST", path, body)
    d.scope["headers"] = [*d.scope["headers"], (b"authorization", f"Bearer {KEY}".encode())]
    return d


async def measure(d: AsgiDriver, n: int, expect: bytes) -> tuple[float, float]:
    """(CPU µs per request, wall p50 µs) over ``n`` sequential requests."""
    lat = []
    c0 = time.process_time()
    for _ in range(n):
        t0 = time.perf_counter()
        status, body = await d()
        lat.append(time.perf_counter() - t0)
        if status != 200 or expect not in body:
            raise RuntimeError(f"{status} {body[:200]!r}")
    return (time.process_time() - c0) / n * 1e6, statistics.median(lat) * 1e6


async def run(rounds: int, n: int, redis_url: str, tmp: Path) -> dict[str, Any]:
    drivers: dict[str, tuple[AsgiDriver, bytes]] = {}
    closers = []
    # middleware alone
    drivers["mw_none"] = (driver(ok_app, "/v1/query"), b"ok")
    for name, url, sync_s in (
        ("mw_local", None, 0.0),
        ("mw_redis", redis_url, 0.0),
        ("mw_redis_sync", redis_url, 0.05),
    ):
        s = settings(tmp / name, url, True, sync_s)
        lim = ApiLimits(s, Auth(s.server))
        closers.append(lim.aclose)
        drivers[name] = (driver(RequestLimits(ok_app, lim), "/v1/query"), b"ok")
    # exact hit through the whole app
    body = orjson.dumps({"query": "When did the Eiffel Tower open?"})
    doc = Document("paris", "Paris is the capital of France. The Eiffel Tower opened in 1889.", "Paris")
    for name, url, limited, sync_s in (
        ("hit_off", None, False, 0.0),
        ("hit_local", None, True, 0.0),
        ("hit_redis_off", redis_url, False, 0.0),
        ("hit_redis", redis_url, True, 0.0),
        ("hit_redis_sync", redis_url, True, 0.05),
    ):
        s = settings(tmp / name, url, limited, sync_s)
        rag = AsyncRAG(s, embedder=HashEmbedder())
        app = create_app(s, rag)
        ctx = app.router.lifespan_context(app)
        await ctx.__aenter__()
        closers.append(lambda ctx=ctx: ctx.__aexit__(None, None, None))
        await rag.ingest([doc], "bench")
        d = driver(app, "/v1/query", body)
        await measure(d, 1, b"1889")  # the miss; every later request is an L1 exact hit
        drivers[name] = (d, b'"exact"')
    for d, expect in drivers.values():
        await measure(d, max(200, n // 5), expect)  # warm-up
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in drivers}
    names = list(drivers)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            d, expect = drivers[name]
            samples[name].append(await measure(d, n, expect))
    for close in closers:
        await close()
    out: dict[str, Any] = {}
    for name, xs in samples.items():
        out[name] = {
            "cpu_us": round(statistics.median(x[0] for x in xs), 2),
            "p50_us": round(statistics.median(x[1] for x in xs), 2),
        }
    for name, base in (
        ("mw_local", "mw_none"),
        ("mw_redis", "mw_none"),
        ("mw_redis_sync", "mw_none"),
        ("hit_local", "hit_off"),
        ("hit_redis", "hit_redis_off"),
        ("hit_redis_sync", "hit_redis_off"),
    ):
        out[name]["overhead_cpu_us"] = round(out[name]["cpu_us"] - out[base]["cpu_us"], 2)
        out[name]["overhead_p50_us"] = round(out[name]["p50_us"] - out[base]["p50_us"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ragline-limits-") as tmp, redis_server(Path(tmp)) as url:
        result = asyncio.run(run(args.rounds, args.requests, url, Path(tmp)))
    report = {"rounds": args.rounds, "requests_per_round": args.requests, "variants": result}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
