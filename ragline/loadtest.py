"""Bounded load against your own deployment: what ``ragline bench`` runs.

Two targets, one report:

* ``bench_url``: ``POST /v1/query`` against a running ragline server (only the
  URL given; an optional API key is sent as ``Authorization: Bearer``);
* ``bench_pipeline`` / ``bench_data_dir``: ``AsyncRAG.ask`` in-process against
  a data dir, no server involved.

Both are closed loops (``concurrency`` workers, each sends its next query when
the previous one has answered, queries used round-robin) bounded twice: at most
``max_requests`` measured requests and at most ``duration_s`` seconds,
whichever comes first, plus a per-request timeout.  The report has requests/s,
latency percentiles of the successful requests, the cache hit rate (from each
answer's ``cache`` field: ``exact`` or ``semantic`` is a hit) and the status mix.

``run_load`` is the generic HTTP engine underneath (any method and path, a
list of requests or a function of the request index, body substring tallies,
a response validator, live progress and early stop); benchmarks and tests use
it directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import orjson

if TYPE_CHECKING:
    from ragline.config import Settings
    from ragline.pipeline import AsyncRAG

__all__ = [
    "BenchConfig",
    "LoadProgress",
    "LoadResult",
    "Req",
    "bench_data_dir",
    "bench_pipeline",
    "bench_url",
    "check_url",
    "read_queries",
    "run_load",
    "run_load_sync",
    "write_png",
]

_JSON_HEADERS = {"content-type": "application/json"}
_HITS = ("exact", "semantic")


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
    """``"count"`` (all requests sent), ``"time"`` (the time limit) or ``"stop"``."""
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


def check_url(url: str) -> str:
    """``url`` without a trailing slash if it is an absolute http(s) URL; else ``ValueError``."""
    try:
        u = httpx.URL(url)
    except Exception as exc:  # httpx.InvalidURL and friends
        raise ValueError(f"not a URL: {url!r} ({exc})") from None
    if u.scheme not in ("http", "https") or not u.host:
        raise ValueError(f"need an http(s)://host[:port] URL, got {url!r}")
    return str(u).rstrip("/")


def _pct(sorted_ms: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending list; 0.0 if empty."""
    if not sorted_ms:
        return 0.0
    rank = max(1, math.ceil(q / 100.0 * len(sorted_ms)))
    return round(sorted_ms[min(rank, len(sorted_ms)) - 1], 3)


@dataclass(slots=True)
class _Tally:
    latencies: list[float] = field(default_factory=list)
    timeline: list[tuple[float, float, bool]] = field(default_factory=list)
    error_kinds: Counter[str] = field(default_factory=Counter)
    status_counts: Counter[str] = field(default_factory=Counter)
    stopped_by: str = "count"
    wall_s: float = 0.0
    cpu_s: float = 0.0


async def _closed_loop(
    call: Callable[[int], Awaitable[tuple[bool, str | None, str | None]]],
    *,
    total: int,
    concurrency: int,
    time_limit_s: float,
    grace_s: float,
    progress: LoadProgress,
    keep_timeline: bool = False,
    think_time_s: float = 0.0,
) -> _Tally:
    """``concurrency`` workers calling ``call(i)`` for i = 0, 1, … until ``total`` calls, the time limit
    or ``progress.stop()``.  ``call`` returns (ok, status, error kind) and must not raise."""
    t = _Tally()
    counter = itertools.count()
    perf = time.perf_counter
    t_start = perf()
    deadline = t_start + time_limit_s
    cpu0 = time.process_time()

    async def worker() -> None:
        while True:
            if progress.stopped:
                t.stopped_by = "stop"
                return
            if perf() >= deadline:
                t.stopped_by = "time"
                return
            i = next(counter)
            if i >= total:
                return
            t0 = perf()
            ok, status, error = await call(i)
            t1 = perf()
            if status is not None:
                t.status_counts[status] += 1
            if ok:
                t.latencies.append((t1 - t0) * 1000.0)
            else:
                t.error_kinds[error or "error"] += 1
                progress.errors += 1
            progress.done += 1
            if keep_timeline:
                t.timeline.append((round(t0 - t_start, 6), round((t1 - t0) * 1000.0, 3), ok))
            if think_time_s:
                await asyncio.sleep(think_time_s)

    # hard bound: the time limit plus one request timeout (workers check the deadline between requests)
    try:
        async with asyncio.timeout(time_limit_s + grace_s):
            await asyncio.gather(*(worker() for _ in range(concurrency)))
    except TimeoutError:
        t.stopped_by = "time"
    t.wall_s = perf() - t_start
    t.cpu_s = time.process_time() - cpu0
    t.latencies.sort()
    return t


def _result(target: str, concurrency: int, t: _Tally, substrings: dict[str, int] | None = None) -> LoadResult:
    lat, wall = t.latencies, t.wall_s
    n_err = sum(t.error_kinds.values())
    n = len(lat) + n_err
    return LoadResult(
        url=target,
        concurrency=concurrency,
        requests=n,
        ok=len(lat),
        errors=n_err,
        duration_s=round(wall, 4),
        rps=round(n / wall, 2) if wall > 0 else 0.0,
        p50_ms=_pct(lat, 50),
        p90_ms=_pct(lat, 90),
        p99_ms=_pct(lat, 99),
        mean_ms=round(sum(lat) / len(lat), 3) if lat else 0.0,
        max_ms=round(lat[-1], 3) if lat else 0.0,
        stopped_by=t.stopped_by,
        error_kinds=dict(t.error_kinds),
        status_counts=dict(t.status_counts),
        substring_counts=substrings or {},
        client_cpu_s=round(t.cpu_s, 4),
        client_cpu_util=round(t.cpu_s / wall, 3) if wall > 0 else 0.0,
        timeline=t.timeline,
    )


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
    workers to ``base_url`` only, stopping early at ``time_limit_s``; never raises on request failures.

    ``requests`` is a list used round-robin or a function of the request index.
    A request counts as an error if it raises (the exception class names it),
    returns a status ≥ 400, or fails ``validate``.  ``think_time_s`` makes each worker pause
    between requests (a paced load, for tests that need it to last a few seconds).
    """
    base = check_url(base_url)
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

        def make(i: int) -> Req:
            return pool[i % len(pool)]

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0))
    subs = tuple(count_substrings)
    sub_counts: Counter[bytes] = Counter()
    async with httpx.AsyncClient(
        base_url=base,
        limits=limits,
        timeout=timeout,
        headers={**_JSON_HEADERS, **(headers or {})},
        trust_env=False,
        follow_redirects=False,
    ) as client:

        async def send(req: Req) -> httpx.Response:
            return await client.request(req.method, req.path, content=req.body)

        if warmup:
            wq = itertools.count()

            async def warm() -> None:
                while (i := next(wq)) < warmup:
                    with contextlib.suppress(httpx.HTTPError):
                        await send(make(i))

            await asyncio.gather(*(warm() for _ in range(min(concurrency, warmup))))

        async def call(i: int) -> tuple[bool, str | None, str | None]:
            req = make(i)
            try:
                resp = await send(req)
            except httpx.HTTPError as exc:
                return False, None, type(exc).__name__
            code = resp.status_code
            for s in subs:
                if s in resp.content:
                    sub_counts[s] += 1
            if code >= 400:
                return False, str(code), f"http_{code}"
            if validate is not None and not validate(req, resp):
                return False, str(code), "invalid_response"
            return True, str(code), None

        tally = await _closed_loop(
            call,
            total=total,
            concurrency=concurrency,
            time_limit_s=time_limit_s,
            grace_s=timeout_s + 5.0,
            progress=progress or LoadProgress(),
            keep_timeline=keep_timeline,
            think_time_s=think_time_s,
        )
    return _result(base, concurrency, tally, {s.decode(errors="replace"): sub_counts[s] for s in subs})


def run_load_sync(base_url: str, requests: Sequence[Req] | Callable[[int], Req], **kwargs: Any) -> LoadResult:
    """``run_load`` on a fresh event loop (uvloop when installed: a cheaper client)."""
    coro = run_load(base_url, requests, **kwargs)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


# ----------------------------------------------------------------------------- ragline bench


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """Bounds and options of one ``ragline bench`` run."""

    concurrency: int = 4
    duration_s: float = 10.0
    """Upper bound on the measured run, seconds."""
    max_requests: int = 1000
    """Upper bound on measured requests."""
    timeout_s: float = 30.0
    """Per request."""
    warmup: int = 0
    """Unmeasured requests first (they fill the cache like real traffic would)."""
    k: int | None = None
    tenant: str | None = None
    """In-process only (over HTTP the API key selects the tenant)."""
    api_key: str | None = None

    def check(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.max_requests < 1:
            raise ValueError(f"max requests must be >= 1, got {self.max_requests}")
        if not self.duration_s > 0 or not self.timeout_s > 0:
            raise ValueError("duration and timeout must be > 0 seconds")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.k is not None and self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")


def read_queries(path: Path) -> list[str]:
    """Queries from a text file (one per line) or JSON lines (``{"query"|"text": ...}``); ``ValueError``
    if the file is missing, unreadable or holds no query."""
    if not path.is_file():
        raise ValueError(f"queries file not found: {path}")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read queries file {path}: {exc}") from None
    out: list[str] = []
    for n, line in enumerate(raw.splitlines(), 1):
        text = line.strip()
        if not text:
            continue
        if text.startswith("{"):
            try:
                d = orjson.loads(text)
            except orjson.JSONDecodeError:
                raise ValueError(f"{path} line {n}: not valid JSON") from None
            q = d.get("query", d.get("text")) if isinstance(d, dict) else None
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f'{path} line {n}: no "query" or "text" string')
            text = q.strip()
        out.append(text)
    if not out:
        raise ValueError(f"no queries in {path}")
    return out


def _report(
    mode: str, target: str, res: LoadResult, kinds: Counter[str], cfg: BenchConfig, n_queries: int
) -> dict[str, Any]:
    answered = sum(kinds.values())
    hits = sum(kinds[k] for k in _HITS)
    return {
        "mode": mode,
        "target": target,
        "queries": n_queries,
        "bounds": {
            "concurrency": cfg.concurrency,
            "duration_s": cfg.duration_s,
            "max_requests": cfg.max_requests,
            "timeout_s": cfg.timeout_s,
            "warmup": cfg.warmup,
        },
        "requests": res.requests,
        "ok": res.ok,
        "errors": res.errors,
        "stopped_by": res.stopped_by,
        "duration_s": res.duration_s,
        "rps": res.rps,
        "latency_ms": {"p50": res.p50_ms, "p90": res.p90_ms, "p99": res.p99_ms, "mean": res.mean_ms, "max": res.max_ms},
        "cache": {
            "hit_rate": round(hits / answered, 4) if answered else 0.0,
            "hits": hits,
            "kinds": dict(sorted(kinds.items())),
        },
        "status": dict(sorted(res.status_counts.items())),
        "error_kinds": dict(sorted(res.error_kinds.items())),
        "client_cpu_util": res.client_cpu_util,
    }


async def bench_url(url: str, queries: Sequence[str], cfg: BenchConfig) -> dict[str, Any]:
    """``POST /v1/query`` against a running server at ``url`` (and nowhere else)."""
    cfg.check()
    base = check_url(url)
    if not queries:
        raise ValueError("no queries given")
    extra = {} if cfg.k is None else {"k": cfg.k}
    reqs = [Req.post_json("/v1/query", {"query": q, **extra}) for q in queries]
    headers = {"authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else None
    kinds: Counter[str] = Counter()

    def validate(_: Req, resp: httpx.Response) -> bool:
        try:
            info = orjson.loads(resp.content).get("cache")
        except (orjson.JSONDecodeError, AttributeError):
            return False
        kinds[str(info.get("kind", "unknown")) if isinstance(info, dict) else "unknown"] += 1
        return True

    res = await run_load(
        base,
        reqs,
        total=cfg.max_requests,
        concurrency=cfg.concurrency,
        time_limit_s=cfg.duration_s,
        warmup=cfg.warmup,
        timeout_s=cfg.timeout_s,
        headers=headers,
        validate=validate,
    )
    return _report("http", base, res, kinds, cfg, len(queries))


async def bench_pipeline(
    rag: AsyncRAG, queries: Sequence[str], cfg: BenchConfig, target: str = "in-process"
) -> dict[str, Any]:
    """``rag.ask`` in-process under the same closed loop; errors are tallied by HTTP-equivalent status."""
    from ragline.errors import RaglineError
    from ragline.types import DEFAULT_TENANT

    cfg.check()
    if not queries:
        raise ValueError("no queries given")
    pool = list(queries)
    tenant = cfg.tenant if cfg.tenant is not None else DEFAULT_TENANT
    kinds: Counter[str] = Counter()

    async def ask(i: int) -> tuple[bool, str | None, str | None]:
        try:
            async with asyncio.timeout(cfg.timeout_s):
                ans = await rag.ask(pool[i % len(pool)], cfg.k, tenant)
        except RaglineError as exc:
            return False, str(exc.status), exc.code
        except TimeoutError:
            return False, None, "timeout"
        except Exception as exc:  # a bug or a component failure: count it, keep measuring
            return False, "500", type(exc).__name__
        kinds[ans.cache.kind] += 1
        return True, "200", None

    for i in range(cfg.warmup):
        await ask(i)
    kinds.clear()
    tally = await _closed_loop(
        ask,
        total=cfg.max_requests,
        concurrency=cfg.concurrency,
        time_limit_s=cfg.duration_s,
        grace_s=cfg.timeout_s + 5.0,
        progress=LoadProgress(),
    )
    return _report("in_process", target, _result(target, cfg.concurrency, tally), kinds, cfg, len(pool))


async def bench_data_dir(settings: Settings, queries: Sequence[str], cfg: BenchConfig) -> dict[str, Any]:
    """``bench_pipeline`` on an ``AsyncRAG`` built from ``settings`` (its data dir must exist)."""
    from ragline.pipeline import AsyncRAG

    cfg.check()
    if not Path(settings.data_dir).is_dir():
        raise ValueError(f"data dir not found: {settings.data_dir}")
    async with AsyncRAG(settings) as rag:
        return await bench_pipeline(rag, queries, cfg, target=str(settings.data_dir))


def write_png(report: dict[str, Any], path: Path) -> None:
    """Latency percentiles, cache kinds and status mix as a PNG; ``ImportError`` without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(12, 3.6))
    lat = report["latency_ms"]
    names = ["p50", "p90", "p99", "max"]
    a1.bar(names, [lat[n] for n in names], color="tab:blue")
    a1.set_ylabel("ms")
    a1.set_title(f"latency ({report['rps']:.1f} req/s)")
    kinds = report["cache"]["kinds"] or {"none": 0}
    a2.bar(list(kinds), list(kinds.values()), color="tab:green")
    a2.set_title(f"cache: hit rate {report['cache']['hit_rate']:.2f}")
    status = dict(report["status"])
    if (lost := report["requests"] - sum(status.values())) > 0:
        status["no response"] = lost
    a3.bar(list(status) or ["none"], list(status.values()) or [0], color="tab:gray")
    a3.set_title(f"status ({report['requests']} requests)")
    fig.suptitle(
        f"ragline bench: {report['target']} ({report['mode']}, concurrency {report['bounds']['concurrency']})",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
