"""Fail open under a Redis outage, over a real running server (DESIGN.md §3.5; issue evidence).

A real ``redis-server`` (the ``redis_server`` fixture) backs a real HTTP server
(uvicorn in a background thread, 127.0.0.1, free port).  A bounded, paced load
(``ragline.loadtest``: concurrency 8) runs ``POST /v1/query`` over a small
set of questions while the test kills Redis (SIGKILL) mid-way and restarts it
on the same port.  Required:

* 0 failed requests, before, during and after the outage;
* ``/readyz`` reports ``"degraded"`` during the outage (the server keeps serving);
* after the restart, L2 hits (``cache.tier == "l2"``) resume within 5 s and
  ``/readyz`` returns to ``"ready"``.

Why L2 is the only cache tier here (``l1_enabled=False, l3_enabled=False``):
with L1 on, the repeated questions would be answered from process memory and
the measured requests would never touch Redis, so its death would prove
nothing; with L3 on, the outage would be absorbed by the disk tier.  Two app
instances sharing Redis would not fix that either: each one promotes L2 hits
into its own L1 after the first read.  Isolating L2 puts Redis on the path of
*every* measured request, so each one exercises the fail-open machinery
(bounded timeouts, the circuit breaker, recompute on a miss) during the
outage, and the recovery is directly observable as ``tier == "l2"``.  (L1 and
L3 behaviour is covered by tests/integration/test_cache_pipeline.py.)
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
import uvicorn

from ragline.config import Settings
from ragline.embed.local import LocalEmbedder
from ragline.loadtest import LoadProgress, Req, run_load
from ragline.pipeline import AsyncRAG
from ragline.server.app import create_app
from tests.fixtures.redis_server import RedisServer

pytestmark = pytest.mark.slow

DOCS = [
    {
        "id": "paris",
        "title": "Paris",
        "text": "Paris is the capital of France. The Eiffel Tower was completed in 1889.",
    },
    {"id": "rome", "title": "Rome", "text": "Rome is the capital of Italy. The Colosseum was completed in 80 AD."},
    {"id": "cats", "title": "Cats", "text": "Domestic cats sleep for up to sixteen hours a day."},
    {"id": "tea", "title": "Tea", "text": "Green tea contains caffeine and antioxidants called catechins."},
    {"id": "moon", "title": "Moon", "text": "The Moon orbits the Earth every 27.3 days."},
    {"id": "bees", "title": "Bees", "text": "Honey bees tell each other where flowers are with a waggle dance."},
    {"id": "iron", "title": "Iron", "text": "Iron melts at 1538 degrees Celsius and is the main metal in steel."},
    {"id": "nile", "title": "Nile", "text": "The Nile flows north through eleven countries into the Mediterranean."},
]
QUESTIONS = [
    "When was the Eiffel Tower completed?",
    "What is the capital of Italy?",
    "How long do cats sleep?",
    "What does green tea contain?",
    "How long does the Moon take to orbit the Earth?",
    "How do honey bees communicate?",
    "At what temperature does iron melt?",
    "Where does the Nile flow?",
]

STOP_AFTER_REQUESTS = 120
MIN_OUTAGE_S = 1.5
MIN_OUTAGE_REQUESTS = 80
L2_RESUME_LIMIT_S = 5.0
READY_LIMIT_S = 10.0
"""The invalidation subscriber reconnects with capped exponential back-off (≤ 5 s)."""


class ThreadedServer:
    """uvicorn serving ``app`` on 127.0.0.1 (free port) in a daemon thread, with its lifespan."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=3)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="ragline-test-server", daemon=True
        )

    def start(self, timeout_s: float = 60.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


@pytest.fixture
def l2_only_server(
    redis_url: str, make_settings: Callable[..., Settings], embedder: LocalEmbedder
) -> Iterator[ThreadedServer]:
    settings = make_settings(cache={"enabled": True, "redis_url": redis_url, "l1_enabled": False, "l3_enabled": False})
    srv = ThreadedServer(create_app(settings, AsyncRAG(settings, embedder=embedder)))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


async def _until(cond: Callable[[], Any], limit_s: float, what: str, step_s: float = 0.02) -> float:
    """Await ``cond()`` truthy (sync or async); returns the seconds it took, fails after ``limit_s``."""
    t0 = time.monotonic()
    while True:
        r = cond()
        if asyncio.iscoroutine(r):
            r = await r
        if r:
            return time.monotonic() - t0
        if time.monotonic() - t0 > limit_s:
            pytest.fail(f"{what}: not within {limit_s} s")
        await asyncio.sleep(step_s)


async def test_redis_outage_under_load_fails_open_and_recovers(
    redis_server: RedisServer, l2_only_server: ThreadedServer
) -> None:
    url = l2_only_server.url
    async with httpx.AsyncClient(base_url=url, timeout=30, trust_env=False) as c:
        r = await c.post("/v1/documents", json={"documents": DOCS})
        assert r.status_code == 200, r.text
        for q in QUESTIONS:  # one miss each stores the answer in L2 ...
            assert (await c.post("/v1/query", json={"query": q})).status_code == 200
        first = (await c.post("/v1/query", json={"query": QUESTIONS[0]})).json()
        assert first["cache"] == {"kind": "exact", "tier": "l2", "similarity": None, "matched_query": None}
        assert (await c.get("/readyz")).json()["status"] == "ready"

        # --- the load: every response is checked and tallied by phase ----------------------
        phase = "before"
        tiers: dict[str, Counter[str]] = {p: Counter() for p in ("before", "stopping", "outage", "after")}
        first_l2_after: list[float] = []
        t_restart = 0.0

        def check(_: Req, resp: httpx.Response) -> bool:
            d = orjson.loads(resp.content)
            cache = d.get("cache") or {}
            label = f"{cache.get('kind')}:{cache.get('tier')}"
            tiers[phase][label] += 1
            if phase == "after" and cache.get("tier") == "l2" and not first_l2_after:
                first_l2_after.append(time.monotonic() - t_restart)
            return isinstance(d.get("answer"), str) and bool(d["answer"]) and bool(d.get("sources"))

        progress = LoadProgress()
        reqs = [Req.post_json("/v1/query", {"query": q}) for q in QUESTIONS]
        load = asyncio.create_task(
            run_load(
                url,
                reqs,
                total=3000,
                concurrency=8,
                time_limit_s=45.0,
                timeout_s=10.0,
                validate=check,
                progress=progress,
                think_time_s=0.01,
                keep_timeline=True,
            )
        )
        readyz: list[tuple[float, str]] = []

        async def status() -> str:
            s = str((await c.get("/readyz")).json()["status"])
            readyz.append((time.monotonic(), s))
            return s

        try:
            await _until(lambda: progress.done >= STOP_AFTER_REQUESTS or load.done(), 20, "load start")
            assert not load.done(), load.result() if not load.cancelled() else "cancelled"

            # --- outage -----------------------------------------------------------------------
            phase = "stopping"  # requests in flight at the kill may still carry an L2 hit
            t_stop = time.monotonic()
            done_at_stop = progress.done
            await asyncio.to_thread(redis_server.stop)
            await asyncio.sleep(0.2)
            phase = "outage"
            degraded_s = await _until(lambda: _eq(status(), "degraded"), 5.0, "/readyz degraded after Redis died")
            await _until(
                lambda: (
                    time.monotonic() - t_stop >= MIN_OUTAGE_S and progress.done - done_at_stop >= MIN_OUTAGE_REQUESTS
                ),
                20,
                "requests during the outage",
            )
            assert (await status()) == "degraded"
            assert progress.errors == 0, f"{progress.errors} failed requests during the outage"

            # --- recovery ---------------------------------------------------------------------
            await asyncio.to_thread(redis_server.start)
            t_restart = time.monotonic()
            phase = "after"
            l2_s = await _until(lambda: bool(first_l2_after), L2_RESUME_LIMIT_S, "L2 hits after the restart")
            ready_s = await _until(
                lambda: _eq(status(), "ready"), READY_LIMIT_S, "/readyz ready after the restart", step_s=0.1
            )
            done_at_ready = progress.done
            await _until(lambda: progress.done - done_at_ready >= 50, 20, "requests after the recovery")
        finally:
            progress.stop()
            result = await load

    stats = {
        "load": result.to_dict(),
        "tiers": {k: dict(v) for k, v in tiers.items()},
        "degraded_after_s": round(degraded_s, 3),
        "l2_hits_after_restart_s": round(first_l2_after[0], 3),
        "l2_poll_s": round(l2_s, 3),
        "ready_after_restart_s": round(ready_s, 3),
    }
    print("fault test:", orjson.dumps(stats).decode())
    assert result.errors == 0 and result.error_kinds == {}, stats
    assert result.ok == result.requests >= STOP_AFTER_REQUESTS + MIN_OUTAGE_REQUESTS + 50, stats
    assert tiers["before"]["exact:l2"] > 0, stats  # L2 really was on the path before ...
    assert tiers["outage"]["exact:l2"] == 0 and tiers["outage"]["miss:None"] > 0, stats  # ... not during ...
    assert tiers["after"]["exact:l2"] > 0, stats  # ... and again after
    assert first_l2_after[0] <= L2_RESUME_LIMIT_S, stats
    assert any(s == "degraded" for _, s in readyz) and readyz[-1][1] == "ready", readyz


async def _eq(value: Any, expected: str) -> bool:
    return bool(await value == expected)
