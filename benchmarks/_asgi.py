"""The hot-path benchmark's in-process part: drive the ASGI app without sockets, what-if variants
of the app, and cProfile summaries (split from hotpath.py)."""

from __future__ import annotations

import asyncio
import cProfile
import io
import pstats
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from _common import percentiles

from ragline.config import Settings
from ragline.pipeline import AsyncRAG


class AsgiDriver:
    """Calls an ASGI app directly (no sockets) with a fixed request."""

    def __init__(self, app: Any, method: str, path: str, body: bytes = b"") -> None:
        self.app = app
        self.body = body
        self.scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8080),
            "headers": [
                (b"host", b"127.0.0.1:8080"),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }

    async def __call__(self) -> tuple[int, bytes]:
        sent = False
        done = asyncio.Event()
        status = 0
        chunks: list[bytes] = []

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": self.body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(msg: dict[str, Any]) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = int(msg["status"])
            elif msg["type"] == "http.response.body":
                chunks.append(msg.get("body", b""))
                if not msg.get("more_body", False):
                    done.set()

        await self.app(dict(self.scope), receive, send)
        done.set()
        return status, b"".join(chunks)


async def time_asgi(driver: AsgiDriver, n: int, expect: bytes) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        status, body = await driver()
        out.append(time.perf_counter() - t0)
        if status != 200 or expect not in body:
            raise RuntimeError(f"ASGI {driver.scope['path']}: {status} {body[:200]!r}")
    return out


async def _cpu_us(driver: AsgiDriver, n: int, expect: bytes) -> tuple[float, list[float]]:
    """CPU µs per request over ``n`` calls (process time: robust to other load on the box), and latencies."""
    c0 = time.process_time()
    lat = await time_asgi(driver, n, expect)
    return (time.process_time() - c0) / n * 1e6, lat


def _what_if_apps(settings: Settings, rag: AsyncRAG) -> dict[str, Any]:
    """The current app and three cheaper shapes of it (measured, never served): without the
    ``@app.middleware("http")`` timing middleware (Starlette's BaseHTTPMiddleware); also with
    ``/v1/query`` as a plain Starlette route (no FastAPI dependency solving); and a pure-ASGI
    exact-hit fast path in front of the app.  The variants use the default tenant (no auth lookup)."""
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from ragline.codec import response_bytes
    from ragline.server.app import create_app
    from ragline.types import DEFAULT_TENANT

    def without_base_middleware() -> Any:
        app = create_app(settings, rag)
        app.user_middleware = [m for m in app.user_middleware if getattr(m, "cls", None) is not BaseHTTPMiddleware]
        app.middleware_stack = None
        return app

    async def answer(raw: bytes) -> bytes:
        d = orjson.loads(raw)
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        body, info = await rag.ask_body(d["query"], d.get("k"), DEFAULT_TENANT, timings=timings)
        timings["total"] = round((time.perf_counter() - t0) * 1000, 3)
        return response_bytes(body, info, timings)

    async def starlette_query(request: Request) -> Response:
        return Response(await answer(await request.body()), media_type="application/json")

    with_route = without_base_middleware()
    with_route.router.routes.insert(0, Route("/v1/query", starlette_query, methods=["POST"]))
    inner = without_base_middleware()

    async def fast_path(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/v1/query":
            chunks = []
            while True:
                msg = await receive()
                chunks.append(msg.get("body", b""))
                if not msg.get("more_body", False):
                    break
            out = await answer(b"".join(chunks))
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": out})
            return
        await inner(scope, receive, send)

    return {
        "current": create_app(settings, rag),
        "without_BaseHTTPMiddleware": without_base_middleware(),
        "plus_query_as_starlette_route": with_route,
        "plus_pure_asgi_exact_hit_path": fast_path,
    }


async def asgi_section(settings: Settings, rag: AsyncRAG, app: Any, body: bytes, n: int) -> dict[str, Any]:
    """Per-request CPU of GET /healthz and of a POST /v1/query exact hit, in-process over raw ASGI,
    for the current app and the what-if variants (interleaved rounds, median)."""
    hit, ok = b'"kind":"exact"', b"ok"
    out: dict[str, Any] = {}
    apps = {"current": app}
    try:
        apps.update({k: v for k, v in _what_if_apps(settings, rag).items() if k != "current"})
    except Exception as exc:  # the app changed shape: measure the current app only
        out["what_if_error"] = f"{type(exc).__name__}: {exc}"
    drivers = {
        name: (AsgiDriver(a, "GET", "/healthz"), AsgiDriver(a, "POST", "/v1/query", body)) for name, a in apps.items()
    }
    for hd, qd in drivers.values():
        await time_asgi(hd, 100, ok)
        await time_asgi(qd, 100, hit)
    rounds = 5
    per = max(50, n // rounds)
    cpu: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in drivers}
    lat: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for name, (hd, qd) in drivers.items():
            ch, lh = await _cpu_us(hd, per, ok)
            cq, lq = await _cpu_us(qd, per, hit)
            cpu[name][0].append(ch)
            cpu[name][1].append(cq)
            if name == "current":
                lat[0].extend(lh)
                lat[1].extend(lq)
    for name, (ch_s, cq_s) in cpu.items():
        h_us, q_us = float(np.median(ch_s)), float(np.median(cq_s))
        out[name] = {
            "healthz_cpu_us": round(h_us, 1),
            "query_hit_cpu_us": round(q_us, 1),
            "ratio_healthz_over_query": round(h_us / q_us, 3),
        }
    out["current"]["healthz_latency"] = percentiles(lat[0], 4)
    out["current"]["query_hit_latency"] = percentiles(lat[1], 4)
    return out


def _profile_summary(prof: cProfile.Profile, n_requests: int, top: int = 25) -> dict[str, Any]:
    """Top functions by own time, and own time summed per package, in µs per request."""
    st = pstats.Stats(prof, stream=io.StringIO())
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = st.stats  # type: ignore[attr-defined]
    per_pkg: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    total = 0.0
    for (file, line, func), (_cc, nc, tt, ct, _callers) in raw.items():
        total += tt
        pkg = _package_of(file)
        per_pkg[pkg] = per_pkg.get(pkg, 0.0) + tt
        rows.append(
            {
                "function": f"{_short(file)}:{line}({func})",
                "calls_per_req": round(nc / n_requests, 2),
                "own_us_per_req": round(tt / n_requests * 1e6, 2),
                "cum_us_per_req": round(ct / n_requests * 1e6, 2),
            }
        )
    by_own = sorted(rows, key=lambda r: -float(r["own_us_per_req"]))[:top]
    by_cum = sorted(rows, key=lambda r: -float(r["cum_us_per_req"]))[:top]
    return {
        "requests": n_requests,
        "profiled_us_per_req": round(total / n_requests * 1e6, 2),
        "own_time_by_package_us_per_req": {
            k: round(v / n_requests * 1e6, 2) for k, v in sorted(per_pkg.items(), key=lambda kv: -kv[1])
        },
        "top_own": by_own,
        "top_cumulative": by_cum,
    }


def _package_of(file: str) -> str:
    if file.startswith("<") or file == "~":
        return "builtins"
    parts = Path(file).parts
    if "site-packages" in parts:
        i = parts.index("site-packages")
        return parts[i + 1] if i + 1 < len(parts) else "site-packages"
    if "ragline" in parts:
        i = len(parts) - 1 - parts[::-1].index("ragline")
        return "ragline." + parts[i + 1].removesuffix(".py") if i + 1 < len(parts) else "ragline"
    return "stdlib:" + Path(file).stem


def _short(file: str) -> str:
    parts = Path(file).parts
    for anchor in ("site-packages", "lib"):
        if anchor in parts:
            i = len(parts) - 1 - parts[::-1].index(anchor)
            return "/".join(parts[i + 1 :])
    return "/".join(parts[-2:])


async def profile(qd: AsgiDriver, hd: AsgiDriver, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, driver, expect in (("query_hit", qd, b'"tier":"l1"'), ("healthz", hd, b"ok")):
        prof = cProfile.Profile()
        prof.enable()
        await time_asgi(driver, n, expect)
        prof.disable()
        out[name] = _profile_summary(prof, n)
    return out
