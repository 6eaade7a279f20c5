"""The API's per-key and per-tenant limits shared through a real redis-server: two app instances
draw on one budget, and when Redis goes away mid-run requests are still served (each instance
falls back to its own buckets) until it answers again.  Both ways of sharing: exact
(``rate_limit_sync_s: 0``, Redis on every request) and synchronised views (the default).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from ragline.config import Settings
from ragline.gateway.redis_state import RedisState
from ragline.pipeline import AsyncRAG
from ragline.server.app import create_app
from ragline.server.audit import key_id
from ragline.server.limits import SyncedBuckets
from ragline.testing import HashEmbedder
from tests.fixtures.redis_server import RedisServer

pytestmark = pytest.mark.slow

KEYS = {"key-a1": "acme", "key-a2": "acme", "key-b": "globex"}


@asynccontextmanager
async def instances(tmp_path: Path, redis_url: str, n: int = 2, **server: Any) -> AsyncIterator[list[Any]]:
    """``n`` apps (own data dirs, own pipelines) on one Redis, each with an in-process client."""
    async with AsyncExitStack() as stack:
        out = []
        for i in range(n):
            s = Settings(
                data_dir=tmp_path / f"d{i}",
                cache={"enabled": True, "redis_url": redis_url, "semantic": False},
                server={"api_keys": KEYS, **server},
            )
            app = create_app(s, AsyncRAG(s, embedder=HashEmbedder()))
            await stack.enter_async_context(app.router.lifespan_context(app))
            c = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=f"http://i{i}")
            out.append((await stack.enter_async_context(c), app))
        yield out


def key(k: str) -> dict[str, str]:
    return {"authorization": f"Bearer {k}"}


async def test_two_instances_share_the_per_key_and_per_tenant_limits(tmp_path: Path, redis_url: str) -> None:
    exact = {"rate_limit_sync_s": 0}
    async with instances(tmp_path, redis_url, rate_limit_per_key_rpm=6, rate_limit_burst=4, **exact) as apps:
        (c1, app1), (c2, _) = apps
        assert isinstance(app1.state.api_limits.state, RedisState)
        codes = [
            (await (c1 if i % 2 else c2).get("/v1/documents", headers=key("key-a1"))).status_code for i in range(6)
        ]
        assert codes == [200] * 4 + [429] * 2  # one budget of 4 over both instances, not 4 each
        r = await c1.get("/v1/documents", headers=key("key-a1"))
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 10
        assert (await c2.get("/v1/documents", headers=key("key-a2"))).status_code == 200  # its own bucket
    async with instances(tmp_path / "t", redis_url, rate_limit_per_tenant_rpm=6, rate_limit_burst=3, **exact) as apps:
        (c1, _), (c2, _) = apps
        assert (await c1.get("/v1/documents", headers=key("key-a1"))).status_code == 200
        assert (await c2.get("/v1/documents", headers=key("key-a2"))).status_code == 200
        assert (await c1.get("/v1/documents", headers=key("key-a2"))).status_code == 200
        assert (await c2.get("/v1/documents", headers=key("key-a1"))).status_code == 429
        assert (await c1.get("/v1/documents", headers=key("key-b"))).status_code == 200  # another tenant
    # Redis holds hashes, never a key or a tenant name
    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        names = [str(k) for k in await redis.keys("ragline:api:*")]
    finally:
        await redis.aclose()
    assert f"ragline:api:{{take}}:k:{key_id('key-a1')}" in names
    assert not any(s in n for n in names for s in ("key-a", "key-b", "acme", "globex"))


async def test_invalidation_limit_is_shared_too(tmp_path: Path, redis_url: str) -> None:
    async with instances(tmp_path, redis_url, admin_keys=["adm"], invalidate_rpm=6, invalidate_burst=2) as apps:
        (c1, _), (c2, _) = apps
        body = {"tenant": "acme"}
        assert (await c1.post("/v1/cache/invalidate", json=body, headers=key("adm"))).status_code == 200
        assert (await c2.post("/v1/cache/invalidate", json=body, headers=key("adm"))).status_code == 200
        r = await c1.post("/v1/cache/invalidate", json=body, headers=key("adm"))
        assert r.status_code == 429 and "retry-after" in r.headers


async def test_redis_stopped_mid_run_fails_open_to_local_limits(
    tmp_path: Path, redis_url: str, redis_server: RedisServer
) -> None:
    async with instances(
        tmp_path,
        redis_url,
        rate_limit_per_key_rpm=60,
        rate_limit_burst=3,
        rate_limit_local_share=0.5,
        rate_limit_sync_s=0,
    ) as apps:
        (c1, app1), (c2, _) = apps
        state: RedisState = app1.state.api_limits.state
        assert (await c1.get("/v1/documents", headers=key("key-a1"))).status_code == 200
        assert state.mode == "redis"
        redis_server.stop()
        try:
            # served, not 500: each instance admits from its own buckets (burst 3, half the rate)
            codes = [(await c1.get("/v1/documents", headers=key("key-b"))).status_code for _ in range(4)]
            assert codes == [200, 200, 200, 429]
            assert state.mode == "local" and state.fallbacks >= 4
            assert (await c2.get("/v1/documents", headers=key("key-b"))).status_code == 200  # its own buckets
            r = await c1.get("/v1/documents", headers=key("key-b"))
            assert r.status_code == 429 and int(r.headers["retry-after"]) == 2  # 1 per 2 s at local_share 0.5
            assert (await c1.get("/healthz")).status_code == 200
        finally:
            redis_server.start()
        # back on the shared state once the breaker lets a call through (reset 1 s)
        for _ in range(50):
            await asyncio.sleep(0.1)
            await c1.get("/v1/documents", headers=key("key-a2"))
            if state.mode == "redis":
                break
        assert state.mode == "redis"


async def test_synchronised_views_share_the_limit_within_a_bounded_overshoot(tmp_path: Path, redis_url: str) -> None:
    async with instances(tmp_path, redis_url, rate_limit_per_key_rpm=6, rate_limit_burst=4) as apps:
        (c1, app1), (c2, _) = apps
        buckets = app1.state.api_limits.buckets
        assert isinstance(buckets, SyncedBuckets) and buckets.sync_s == 0.05
        codes = [(await c1.get("/v1/documents", headers=key("key-a1"))).status_code for _ in range(5)]
        assert codes == [200] * 4 + [429]  # decided in process
        await asyncio.sleep(0.3)  # c1 has sent its 4 requests to Redis
        r = await c2.get("/v1/documents", headers=key("key-a1"))
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1  # c2 read the shared debt first
        # both instances at once, before either has exchanged: at most one burst each
        ok = 0
        for i in range(12):
            ok += (await (c1 if i % 2 else c2).get("/v1/documents", headers=key("key-a2"))).status_code == 200
        assert 4 <= ok <= 8
        await asyncio.sleep(0.3)
        for c in (c1, c2):  # the views have caught up: the shared debt holds both back
            assert (await c.get("/v1/documents", headers=key("key-a2"))).status_code == 429
        assert buckets.syncs >= 2 and buckets.failed_syncs == 0


async def test_synchronised_views_fail_open_when_redis_stops(
    tmp_path: Path, redis_url: str, redis_server: RedisServer
) -> None:
    async with instances(tmp_path, redis_url, rate_limit_per_key_rpm=60, rate_limit_burst=3) as apps:
        (c1, app1), _ = apps
        buckets: SyncedBuckets = app1.state.api_limits.buckets
        assert (await c1.get("/v1/documents", headers=key("key-a1"))).status_code == 200
        await asyncio.sleep(0.2)
        redis_server.stop()
        try:
            codes = [(await c1.get("/v1/documents", headers=key("key-b"))).status_code for _ in range(5)]
            assert codes == [200, 200, 200, 429, 429]  # served from the view, limited by it
            await asyncio.sleep(0.2)
            assert buckets.mode == "local" and buckets.failed_syncs >= 1
            assert (await c1.get("/healthz")).status_code == 200
        finally:
            redis_server.start()
        for _ in range(50):
            await asyncio.sleep(0.1)
            await c1.get("/v1/documents", headers=key("key-a2"))
            if buckets.mode == "redis":
                break
        assert buckets.mode == "redis"
        synced = buckets.syncs
        await c1.get("/v1/documents", headers=key("key-a2"))
        await asyncio.sleep(0.2)
        assert buckets.syncs > synced


async def test_charge_spreads_requests_over_their_age_and_take_sees_them(redis_url: str) -> None:
    state = RedisState(redis_url, prefix="t:")
    try:
        # 2 requests at 60 rpm admitted over the last 5 s: paid off already (no debt, no error)
        assert (debts := await state.charge([("k", 60.0, 2)], age_s=5.0)) is not None and debts[0] < 0
        assert (debts := await state.charge([("k", 60.0, 4)])) is not None
        assert debts[0] == pytest.approx(4.0, abs=0.05)
        v = await state.take([("k", 60.0, 3)])  # tolerance 2 s < 4 s owed
        assert not v.ok and v.reason == "k" and v.wait_s == pytest.approx(2.0, abs=0.05)
        assert (debts := await state.charge([("k", 60.0, 0)])) is not None  # a read charges nothing
        assert debts[0] == pytest.approx(4.0, abs=0.05)
    finally:
        await state.aclose()
