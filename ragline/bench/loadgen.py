"""A bounded async HTTP load generator for 127.0.0.1 (benchmarks and tests).

``run_load`` drives ``concurrency`` workers over one ``httpx.AsyncClient``
whose connection pool holds exactly ``concurrency`` keep-alive connections
(closed loop: each worker sends its next request when the previous one has
answered).  It is bounded twice: it stops after ``total`` measured requests
*or* after ``time_limit_s`` seconds, whichever comes first, and every request
has its own timeout.  It refuses any host but ``127.0.0.1`` — it is a
measuring tool, not a way to load someone else's server.

The result has requests/s, latency p50/p90/p99 (of the successful requests),
error counts by kind (HTTP status or exception name), optional substring
tallies of the response bodies (e.g. ``b'"tier":"l1"'`` to prove that every
answer was an L1 hit), and the client's own CPU time, because on a small box
the load generator competes with the server for the same cores.

From another process (what the benchmarks do, so the client does not share
the server's interpreter)::

    python -m ragline.bench.loadgen --url http://127.0.0.1:8080 --path /healthz \\
        --total 5000 --concurrency 16 --time-limit 20 --warmup 200
    python -m ragline.bench.loadgen --url http://127.0.0.1:8080 --method POST --path /v1/query \\
        --bodies queries.jsonl --count '"tier":"l1"' --json

``--bodies`` is a JSON-lines file, one request body per line, used round-robin.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

__all__ = ["ALLOWED_HOSTS", "LoadProgress", "LoadResult", "Req", "check_local_url", "run_load", "run_load_sync"]

ALLOWED_HOSTS: frozenset[str] = frozenset({"127.0.0.1"})
"""The only hosts the generator will send requests to."""

_JSON_HEADERS = {"content-type": "application/json"}


@dataclass(frozen=True, slots=True)
class Req:
    """One request: method, path (joined to the base URL) and an optional pre-serialised body."""

    method: str
    path: str
    body: bytes | None = None

    @classmethod
    def post_json(cls, path: str, payload: Any) -> Req:
        return cls("POST", path, orjson.dumps(payload))


@dataclass(slots=True)
class LoadProgress:
    """Counters updated while the load runs (readable from the same event loop, e.g. by a
    fault test that stops a backend after ``done`` requests); ``stop()`` ends the run early."""

    done: int = 0
    errors: int = 0
    stopped: bool = False

    def stop(self) -> None:
        self.stopped = True


@dataclass(slots=True)
class LoadResult:
    """What one run measured.  Latencies are in milliseconds, of successful requests only."""

    url: str
    concurrency: int
    requests: int
    ok: int
    errors: int
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    stopped_by: str
    """``"count"`` (all ``total`` requests sent), ``"time"`` (the time limit) or ``"stop"``."""
    error_kinds: dict[str, int] = field(default_factory=dict)
    status_counts: dict[str, int] = field(default_factory=dict)
    substring_counts: dict[str, int] = field(default_factory=dict)
    client_cpu_s: float = 0.0
    client_cpu_util: float = 0.0
    """Client CPU seconds / wall seconds: 1.0 means the generator saturated one core."""
    timeline: list[tuple[float, float, bool]] = field(default_factory=list)
    """With ``keep_timeline``: (start offset s, latency ms, ok) per measured request."""

    def to_dict(self, timeline: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not timeline:
            d.pop("timeline")
        return d


def check_local_url(url: str) -> str:
    """Return ``url`` without a trailing slash if it is ``http(s)://127.0.0.1[:port]``; else ValueError."""
    try:
        u = httpx.URL(url)
    except Exception as exc:  # httpx.InvalidURL and friends
        raise ValueError(f"not a URL: {url!r} ({exc})") from None
    if u.scheme not in ("http", "https"):
        raise ValueError(f"only http(s) URLs are supported, got {url!r}")
    if u.host not in ALLOWED_HOSTS:
        raise ValueError(f"refusing to load {u.host!r}: the load generator only targets "
                         f"{', '.join(sorted(ALLOWED_HOSTS))}")
    return str(u).rstrip("/")


def _pct(sorted_ms: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending list; 0.0 if empty."""
    if not sorted_ms:
        return 0.0
    rank = max(1, math.ceil(q / 100.0 * len(sorted_ms)))
    return round(sorted_ms[min(rank, len(sorted_ms)) - 1], 3)


async def run_load(
    base_url: str,
    requests: Sequence[Req] | Callable[[int], Req],
    *,
    total: int,
    concurrency: int = 8,
    time_limit_s: float = 30.0,
    warmup: int = 0,
    timeout_s: float = 10.0,
    headers: dict[str, str] | None = None,
    count_substrings: Sequence[bytes] = (),
    validate: Callable[[Req, httpx.Response], bool] | None = None,
    progress: LoadProgress | None = None,
    keep_timeline: bool = False,
    think_time_s: float = 0.0,
) -> LoadResult:
    """Send ``total`` measured requests (after ``warmup`` unmeasured ones) with ``concurrency``
    workers, stopping early at ``time_limit_s``; never raises on request failures.

    ``requests`` is a list used round-robin or a function of the request index.
    A request counts as an error if it raises (the exception class names it),
    returns a status ≥ 400, or fails ``validate``.  ``think_time_s`` makes each worker pause
    between requests (a paced load, for tests that need it to last a few seconds).
    """
    base = check_local_url(base_url)
    if total < 1 or concurrency < 1 or warmup < 0:
        raise ValueError("total and concurrency must be >= 1 and warmup >= 0")
    if not (time_limit_s > 0 and timeout_s > 0 and think_time_s >= 0):
        raise ValueError("time_limit_s and timeout_s must be > 0, think_time_s >= 0")
    if callable(requests):
        make: Callable[[int], Req] = requests
    else:
        pool = list(requests)
        if not pool:
            raise ValueError("no requests given")
        n_pool = len(pool)

        def make(i: int) -> Req:
            return pool[i % n_pool]

    prog = progress if progress is not None else LoadProgress()
    hdrs = {**_JSON_HEADERS, **(headers or {})}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0))
    latencies: list[float] = []
    timeline: list[tuple[float, float, bool]] = []
    error_kinds: Counter[str] = Counter()
    status_counts: Counter[str] = Counter()
    subs = tuple(count_substrings)
    sub_counts: Counter[bytes] = Counter()
    counter = itertools.count()
    perf = time.perf_counter

    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=timeout, headers=hdrs,
                                 trust_env=False, follow_redirects=False) as client:

        async def send(req: Req) -> httpx.Response:
            return await client.request(req.method, req.path, content=req.body)

        if warmup:
            wq = itertools.count()

            async def warm() -> None:
                while (i := next(wq)) < warmup:
                    with contextlib.suppress(httpx.HTTPError):
                        await send(make(i))

            await asyncio.gather(*(warm() for _ in range(min(concurrency, warmup))))

        t_start = perf()
        deadline = t_start + time_limit_s
        cpu0 = time.process_time()
        stopped_by = "count"

        async def worker() -> None:
            nonlocal stopped_by
            while True:
                if prog.stopped:
                    stopped_by = "stop"
                    return
                if perf() >= deadline:
                    stopped_by = "time"
                    return
                i = next(counter)
                if i >= total:
                    return
                req = make(i)
                t0 = perf()
                ok = False
                try:
                    resp = await send(req)
                except httpx.HTTPError as exc:
                    error_kinds[type(exc).__name__] += 1
                else:
                    code = resp.status_code
                    status_counts[str(code)] += 1
                    if code >= 400:
                        error_kinds[f"http_{code}"] += 1
                    elif validate is not None and not validate(req, resp):
                        error_kinds["invalid_response"] += 1
                    else:
                        ok = True
                    if subs:
                        content = resp.content
                        for s in subs:
                            if s in content:
                                sub_counts[s] += 1
                t1 = perf()
                if ok:
                    latencies.append((t1 - t0) * 1000.0)
                else:
                    prog.errors += 1
                prog.done += 1
                if keep_timeline:
                    timeline.append((round(t0 - t_start, 6), round((t1 - t0) * 1000.0, 3), ok))
                if think_time_s:
                    await asyncio.sleep(think_time_s)

        # hard bound: the time limit plus one request timeout (workers check the deadline between requests)
        try:
            async with asyncio.timeout(time_limit_s + timeout_s + 5.0):
                await asyncio.gather(*(worker() for _ in range(concurrency)))
        except TimeoutError:
            stopped_by = "time"
        wall = perf() - t_start
        cpu = time.process_time() - cpu0

    latencies.sort()
    n_err = sum(error_kinds.values())
    n = len(latencies) + n_err
    return LoadResult(
        url=base, concurrency=concurrency, requests=n, ok=len(latencies), errors=n_err,
        duration_s=round(wall, 4), rps=round(n / wall, 2) if wall > 0 else 0.0,
        p50_ms=_pct(latencies, 50), p90_ms=_pct(latencies, 90), p99_ms=_pct(latencies, 99),
        mean_ms=round(sum(latencies) / len(latencies), 3) if latencies else 0.0,
        max_ms=round(latencies[-1], 3) if latencies else 0.0, stopped_by=stopped_by,
        error_kinds=dict(error_kinds), status_counts=dict(status_counts),
        substring_counts={s.decode(errors="replace"): sub_counts[s] for s in subs},
        client_cpu_s=round(cpu, 4), client_cpu_util=round(cpu / wall, 3) if wall > 0 else 0.0,
        timeline=timeline,
    )


def run_load_sync(base_url: str, requests: Sequence[Req] | Callable[[int], Req], **kwargs: Any) -> LoadResult:
    """``run_load`` on a fresh event loop (uvloop when installed: a cheaper client)."""
    coro = run_load(base_url, requests, **kwargs)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _read_bodies(path: Path) -> list[bytes]:
    out = []
    for line in path.read_bytes().splitlines():
        if line.strip():
            out.append(orjson.dumps(orjson.loads(line)))  # validate + compact
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ragline.bench.loadgen",
                                description="Bounded HTTP load against 127.0.0.1 (see module docs).")
    p.add_argument("--url", required=True, help="base URL, http://127.0.0.1:PORT")
    p.add_argument("--method", default="GET")
    p.add_argument("--path", default="/healthz")
    p.add_argument("--bodies", type=Path, default=None, help="JSON-lines file of request bodies (round-robin)")
    p.add_argument("--total", type=int, default=5000, help="measured requests (upper bound)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--time-limit", type=float, default=20.0, help="seconds (upper bound)")
    p.add_argument("--warmup", type=int, default=0, help="unmeasured requests first")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request timeout, seconds")
    p.add_argument("--think", type=float, default=0.0, help="pause per worker between requests, seconds")
    p.add_argument("--count", action="append", default=[], help="tally responses containing this substring")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    a = p.parse_args(argv)
    try:
        base = check_local_url(a.url)
    except ValueError as exc:
        p.error(str(exc))
    if a.bodies is not None:
        reqs = [Req(a.method.upper(), a.path, b) for b in _read_bodies(a.bodies)]
    else:
        reqs = [Req(a.method.upper(), a.path)]
    res = run_load_sync(base, reqs, total=a.total, concurrency=a.concurrency, time_limit_s=a.time_limit,
                        warmup=a.warmup, timeout_s=a.timeout, think_time_s=a.think,
                        count_substrings=[s.encode() for s in a.count])
    if a.json:
        sys.stdout.write(orjson.dumps(res.to_dict()).decode() + "\n")
    else:
        print(f"{a.method.upper()} {a.path}: {res.requests} requests in {res.duration_s:.2f} s "
              f"({res.stopped_by}) = {res.rps:.0f} req/s; p50 {res.p50_ms:.2f} ms, p90 {res.p90_ms:.2f} ms, "
              f"p99 {res.p99_ms:.2f} ms; errors {res.errors} {res.error_kinds or ''}; "
              f"client CPU {res.client_cpu_util:.0%}")
        if res.substring_counts:
            print("substrings:", res.substring_counts)
    return 0 if res.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
