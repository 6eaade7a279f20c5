"""Per-key and per-tenant request limits, and the admin surface (cache stats, metrics token, audited
and rate-limited invalidation), on the in-process app; the bucket algorithm on a fake clock.

``tests/integration/test_api_limits_redis.py`` runs the limits shared through a real redis-server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from ragline.config import Settings
from ragline.gateway.state import LocalState
from ragline.pipeline import AsyncRAG
from ragline.server.app import create_app
from ragline.server.audit import key_id
from ragline.server.limits import SyncedBuckets
from ragline.testing import HashEmbedder

KEYS = {"key-a1": "acme", "key-a2": "acme", "key-b": "globex"}
ADMIN = "admin-secret"


def settings(tmp_path: Path, **server: Any) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        cache={"enabled": True, "redis_url": None, "semantic": False},
        server={"api_keys": KEYS, "admin_keys": [ADMIN], **server},
    )


@asynccontextmanager
async def client(tmp_path: Path, **server: Any) -> AsyncIterator[httpx.AsyncClient]:
    s = settings(tmp_path, **server)
    app = create_app(s, AsyncRAG(s, embedder=HashEmbedder()))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        yield c


def key(k: str) -> dict[str, str]:
    return {"authorization": f"Bearer {k}"}


# ------------------------------------------------------------------------------------------ the buckets


class Clock:
    def __init__(self) -> None:
        self.ms = 1_000_000.0

    def __call__(self) -> float:
        return self.ms


def test_burst_then_one_per_interval() -> None:
    clock = Clock()
    s = LocalState(clock)
    b = [("k", 60.0, 3)]
    assert all(s.take_now(b).ok for _ in range(3))  # the burst
    v = s.take_now(b)
    assert not v.ok and v.reason == "k" and v.wait_s == pytest.approx(1.0)
    clock.ms += 999
    assert not s.take_now(b).ok
    clock.ms += 2
    assert s.take_now(b).ok
    assert not s.take_now(b).ok  # the burst is spent: one per second from here
    clock.ms += 3000  # three intervals idle: the full burst is back, not more
    assert all(s.take_now(b).ok for _ in range(3))
    assert not s.take_now(b).ok


def test_burst_one_is_the_gateways_rule_and_the_state_is_untouched() -> None:
    clock = Clock()
    s = LocalState(clock)
    assert s.take_now([("a", 120.0, 1)]).ok
    assert s.take_now([("a", 120.0, 1)]).wait_s == pytest.approx(0.5)
    assert not s._entries  # the gateway's per-upstream entries are not involved


def test_all_or_nothing_and_the_longest_wait_is_reported() -> None:
    clock = Clock()
    s = LocalState(clock)
    key, tenant = ("k", 60.0, 1), ("t", 30.0, 1)
    assert s.take_now([key, tenant]).ok
    clock.ms += 1000  # the key is free again, the tenant waits one more second
    v = s.take_now([key, tenant])
    assert not v.ok and v.reason == "t" and v.wait_s == pytest.approx(1.0)
    assert s.take_now([key]).ok  # the refused request charged the key nothing
    assert not s.take_now([key]).ok


def test_idle_buckets_are_dropped_when_there_are_many() -> None:
    clock = Clock()
    s = LocalState(clock)
    for i in range(70_000):
        s.take_now([(f"a:{i}", 60_000.0, 1)])  # 1 ms interval
    clock.ms += 10
    s.take_now([("new", 60.0, 1)])
    assert len(s._buckets) < 10


def test_raise_debt_never_lowers_it() -> None:
    clock = Clock()
    s = LocalState(clock)
    s.raise_debt("k", 2.0)
    assert s.take_now([("k", 60.0, 1)]).wait_s == pytest.approx(2.0)
    s.raise_debt("k", 0.5)
    assert s.take_now([("k", 60.0, 1)]).wait_s == pytest.approx(2.0)


class FakeShared:
    """The shared buckets (what RedisState.charge does, on a LocalState of its own): for SyncedBuckets."""

    def __init__(self) -> None:
        self.mode = "redis"
        self.tats: dict[str, float] = {}
        self.calls: list[list[tuple[str, float, int]]] = []

    async def charge(self, buckets: list[tuple[str, float, int]], age_s: float = 0.0) -> list[float] | None:
        self.calls.append(list(buckets))
        if self.mode != "redis":
            return None
        now = time.monotonic()
        out = []
        for name, rpm, n in buckets:
            self.tats[name] = max(self.tats.get(name, 0.0), now - age_s) + n * 60.0 / rpm
            out.append(self.tats[name] - now)
        return out


async def test_synced_buckets_admit_in_process_and_exchange_in_the_background() -> None:
    shared = FakeShared()
    b = SyncedBuckets(shared, 0.02)  # type: ignore[arg-type]
    bucket = [("k", 60.0, 3)]
    assert [(await b.take(bucket)).ok for _ in range(4)] == [True, True, True, False]
    assert shared.calls == [[("k", 60.0, 0)]]  # one read when first seen, nothing per request
    await asyncio.sleep(0.1)
    assert shared.calls[1] == [("k", 60.0, 3)] and b.syncs == 1  # the three admitted, in one exchange
    assert shared.tats["k"] - time.monotonic() == pytest.approx(3.0, abs=0.5)
    # another process charged 5 more: the next exchange raises this view
    shared.tats["k"] += 5.0
    assert not (await b.take(bucket)).ok
    await asyncio.sleep(0.1)
    v = await b.take(bucket)
    assert not v.ok and v.wait_s == pytest.approx(6.0, abs=0.5)  # 8 s owed, minus the burst's 2 s
    # Redis away: the view decides alone, exchanges fail and are counted
    shared.mode = "local"
    assert not (await b.take(bucket)).ok
    assert (await b.take([("new", 60.0, 2)])).ok
    await asyncio.sleep(0.1)
    assert b.failed_syncs >= 1
    await b.aclose()


# ------------------------------------------------------------------------------------------ the API


async def test_per_key_limit_429_with_retry_after(tmp_path: Path) -> None:
    async with client(tmp_path, rate_limit_per_key_rpm=60, rate_limit_burst=3) as c:
        for _ in range(3):
            assert (await c.get("/v1/documents", headers=key("key-a1"))).status_code == 200
        r = await c.get("/v1/documents", headers=key("key-a1"))
        assert r.status_code == 429
        assert r.headers["retry-after"] == "1"
        err = r.json()["error"]
        assert err["code"] == "rate_limited" and "this API key" in err["message"] and "key-a1" not in err["message"]
        # another key of the same tenant, and another tenant, have their own buckets
        assert (await c.get("/v1/documents", headers=key("key-a2"))).status_code == 200
        assert (await c.get("/v1/documents", headers={"x-api-key": "key-b"})).status_code == 200
        text = (await c.get("/metrics")).text
        assert 'ragline_rate_limited_total{scope="key"}' in text


async def test_per_tenant_limit_spans_its_keys_other_tenants_unaffected(tmp_path: Path) -> None:
    async with client(tmp_path, rate_limit_per_tenant_rpm=60, rate_limit_burst=3) as c:
        assert (await c.get("/v1/documents", headers=key("key-a1"))).status_code == 200
        assert (await c.get("/v1/documents", headers=key("key-a1"))).status_code == 200
        assert (await c.get("/v1/documents", headers=key("key-a2"))).status_code == 200
        r = await c.get("/v1/documents", headers=key("key-a2"))
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert "this tenant" in r.json()["error"]["message"] and "acme" not in r.text
        assert (await c.get("/v1/documents", headers=key("key-a1"))).status_code == 429
        for _ in range(3):
            assert (await c.get("/v1/documents", headers=key("key-b"))).status_code == 200
        text = (await c.get("/metrics")).text
        assert 'ragline_rate_limited_total{scope="tenant"}' in text
        assert "acme" not in text and "globex" not in text


async def test_anonymous_clients_and_unknown_keys(tmp_path: Path) -> None:
    async with client(tmp_path, rate_limit_per_key_rpm=60, rate_limit_burst=2) as c:
        for _ in range(5):  # an unknown key gets 401 from the route and charges no bucket
            assert (await c.get("/v1/documents", headers=key("nope"))).status_code == 401
        assert (await c.get("/v1/documents")).status_code == 200  # no key: the client address' bucket
        assert (await c.get("/v1/documents")).status_code == 200
        r = await c.get("/v1/documents")
        assert r.status_code == 429 and "this client" in r.json()["error"]["message"]
        assert (await c.get("/v1/documents", headers=key("key-a1"))).status_code == 200


async def test_health_readiness_metrics_and_docs_are_not_limited(tmp_path: Path) -> None:
    async with client(tmp_path, rate_limit_per_key_rpm=1, rate_limit_per_tenant_rpm=1, rate_limit_burst=1) as c:
        assert (await c.get("/v1/documents")).status_code == 200
        assert (await c.get("/v1/documents")).status_code == 429
        for _ in range(10):
            for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
                assert (await c.get(path)).status_code == 200, path


async def test_no_limits_configured_installs_no_middleware(tmp_path: Path) -> None:
    s = settings(tmp_path)
    app = create_app(s, AsyncRAG(s, embedder=HashEmbedder()))
    assert not any(m.cls.__name__ == "RequestLimits" for m in app.user_middleware)  # type: ignore[attr-defined]
    async with client(tmp_path) as c:
        for _ in range(30):
            assert (await c.get("/v1/documents")).status_code == 200


async def test_answers_metric_names_no_tenant(tmp_path: Path) -> None:
    async with client(tmp_path) as c:
        docs = {"documents": [{"id": "p", "text": "Paris is the capital of France."}]}
        assert (await c.post("/v1/documents", json=docs, headers=key("key-b"))).status_code == 200
        for _ in range(2):
            assert (await c.post("/v1/query", json={"query": "capital of France?"}, headers=key("key-b"))).is_success
        text = (await c.get("/metrics")).text
        lines = [ln for ln in text.splitlines() if ln.startswith("ragline_answers_total{")]
        assert lines and all("tenant" not in ln for ln in lines)
        assert "globex" not in text


# ------------------------------------------------------------------------------------------ the admin surface


async def test_cache_stats_needs_an_admin_key(tmp_path: Path) -> None:
    async with client(tmp_path) as c:
        assert (await c.get("/v1/cache/stats")).status_code == 401
        assert (await c.get("/v1/cache/stats", headers=key("key-a1"))).status_code == 403
        r = await c.get("/v1/cache/stats", headers=key(ADMIN))
        assert r.status_code == 200 and r.json()["enabled"] is True


async def test_metrics_token(tmp_path: Path) -> None:
    async with client(tmp_path, metrics_token="scrape-me") as c:
        assert (await c.get("/metrics")).status_code == 401
        assert (await c.get("/metrics", headers=key("wrong"))).status_code == 401
        non_ascii = {b"authorization": "Bearer scrapé-me".encode()}  # raw UTF-8 bytes: 401, not 500
        assert (await c.get("/metrics", headers=non_ascii)).status_code == 401
        assert (await c.get("/metrics", headers=key(ADMIN))).status_code == 401  # an admin key is not the token
        r = await c.get("/metrics", headers=key("scrape-me"))
        assert r.status_code == 200 and "ragline_http_request_duration_seconds" in r.text
        assert (await c.get("/healthz")).status_code == 200
    async with client(tmp_path / "open") as c:  # no token configured: open, as before
        assert (await c.get("/metrics")).status_code == 200


async def test_invalidation_is_rate_limited_and_audited(tmp_path: Path) -> None:
    log = tmp_path / "audit" / "admin.log"
    async with client(tmp_path, invalidate_rpm=60, invalidate_burst=2, audit_log=log) as c:
        body = {"tenant": "acme"}
        assert (await c.post("/v1/cache/invalidate", json=body)).status_code == 401
        assert (await c.post("/v1/cache/invalidate", json=body, headers=key("key-a1"))).status_code == 403
        for _ in range(2):
            r = await c.post("/v1/cache/invalidate", json=body, headers=key(ADMIN))
            assert r.status_code == 200 and r.json() == {"invalidated": 0}
        r = await c.post("/v1/cache/invalidate", json={"all": True}, headers=key(ADMIN))
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "rate_limited"
        assert "invalidate_rpm" in r.json()["error"]["message"]
    raw = log.read_bytes()
    assert ADMIN.encode() not in raw and b"key-a1" not in raw  # never the keys themselves
    lines = [orjson.loads(x) for x in raw.splitlines()]
    assert [(e["status"], e["result"]) for e in lines] == [
        (401, "unauthorized"),
        (403, "forbidden"),
        (200, "ok"),
        (200, "ok"),
        (429, "rate_limited"),
    ]
    assert [e["key_id"] for e in lines] == [None, key_id("key-a1"), key_id(ADMIN), key_id(ADMIN), key_id(ADMIN)]
    assert all(e["action"] == "cache.invalidate" and e["client"] == "127.0.0.1" for e in lines)
    assert lines[2]["params"] == {"tenant": "acme", "doc_id": None, "key": None, "all": False}
    assert lines[2]["invalidated"] == 0 and "invalidated" not in lines[4]
    assert lines[4]["params"]["all"] is True
    assert lines[0]["time"].endswith("+00:00")
    assert log.stat().st_mode & 0o777 == 0o600


async def test_audit_log_defaults_to_the_data_dir(tmp_path: Path) -> None:
    async with client(tmp_path) as c:
        assert (await c.post("/v1/cache/invalidate", json={"all": True}, headers=key(ADMIN))).status_code == 200
    (entry,) = [orjson.loads(x) for x in (tmp_path / "data" / "audit.log").read_bytes().splitlines()]
    assert entry["result"] == "ok" and entry["params"]["all"] is True
