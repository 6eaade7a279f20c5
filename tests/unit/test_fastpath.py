"""The exact-hit fast path of ``POST /v1/query`` (ragline.server.fastpath) on the in-process app:
it serves exactly what the route serves, only for exact L1 hits, still behind auth, tenants, the
per-key limits and the metrics; everything else falls through to the route unchanged."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI

from ragline.codec import response_bytes
from ragline.config import Settings
from ragline.pipeline import AsyncRAG
from ragline.server.app import create_app
from ragline.server.fastpath import ExactHitPath
from ragline.testing import HashEmbedder, ScriptedLLM
from ragline.types import Document

KEYS = {"key-a": "acme", "key-b": "globex"}
Q = "When did the Eiffel Tower open?"


@asynccontextmanager
async def client(tmp_path: Path, **server: Any) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI, AsyncRAG]]:
    s = Settings(
        data_dir=tmp_path / "data",
        cache={"enabled": True, "redis_url": None, "semantic": False},
        server={"api_keys": KEYS, **server},
    )
    rag = AsyncRAG(s, embedder=HashEmbedder(), llm=ScriptedLLM())
    app = create_app(s, rag)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        for tenant in ("acme", "globex"):
            await rag.ingest([Document("eiffel", "The Eiffel Tower opened in 1889 in Paris.")], tenant)
        yield c, app, rag


def fast_path(app: FastAPI) -> ExactHitPath:
    layer: Any = app.middleware_stack
    while layer is not None:
        if isinstance(layer, ExactHitPath):
            return layer
        layer = getattr(layer, "app", None)
    raise AssertionError("no ExactHitPath in the middleware stack")


def key(k: str) -> dict[str, str]:
    return {"authorization": f"Bearer {k}"}


async def test_a_hit_is_served_by_the_fast_path_with_the_routes_bytes(tmp_path: Path) -> None:
    async with client(tmp_path) as (c, app, rag):
        first = await c.post("/v1/query", json={"query": Q}, headers=key("key-a"))
        assert first.status_code == 200 and first.json()["cache"]["kind"] == "miss"
        fp = fast_path(app)
        assert fp.served == 0  # a miss went to the route
        hit = await c.post("/v1/query", json={"query": Q}, headers=key("key-a"))
        assert hit.status_code == 200 and fp.served == 1
        assert hit.headers["content-type"] == "application/json"
        assert int(hit.headers["content-length"]) == len(hit.content)
        got = hit.json()
        assert got["cache"] == {"kind": "exact", "tier": "l1", "similarity": None, "matched_query": None}
        assert set(got["timings"]) == {"total"}
        body, info = await rag.ask_body(Q, None, "acme")
        want = orjson.loads(response_bytes(body, info, None))
        assert {k: v for k, v in got.items() if k != "timings"} == want
        # the same with "timings": false (no timings), "cache": "default", "history": [], an X-API-Key
        for extra in ({"timings": False}, {"cache": "default", "history": []}, {"k": None}):
            r = await c.post("/v1/query", json={"query": Q, **extra}, headers={"x-api-key": "key-a"})
            assert r.status_code == 200 and r.json()["cache"]["kind"] == "exact"
        assert (
            "timings"
            not in (await c.post("/v1/query", json={"query": Q, "timings": False}, headers=key("key-a"))).json()
        )
        assert fp.served == 5


async def test_tenants_and_auth_hold(tmp_path: Path) -> None:
    async with client(tmp_path, require_api_key=True) as (c, app, _):
        await c.post("/v1/query", json={"query": Q}, headers=key("key-a"))
        assert (await c.post("/v1/query", json={"query": Q}, headers=key("key-a"))).json()["cache"]["kind"] == "exact"
        other = await c.post("/v1/query", json={"query": Q}, headers=key("key-b"))  # another tenant: its own miss
        assert other.status_code == 200 and other.json()["cache"]["kind"] == "miss"
        unknown = await c.post("/v1/query", json={"query": Q}, headers=key("nope"))
        assert unknown.status_code == 401 and unknown.json()["error"]["code"] == "unauthorized"
        missing = await c.post("/v1/query", json={"query": Q})
        assert missing.status_code == 401
        assert fast_path(app).served == 1


async def test_everything_else_falls_through_to_the_route(tmp_path: Path) -> None:
    async with client(tmp_path) as (c, app, _):
        await c.post("/v1/query", json={"query": Q})
        bad = [
            (b"{not json", {"content-type": "application/json"}, 400),
            (orjson.dumps({"query": Q}), {"content-type": "text/plain"}, 415),
            (orjson.dumps([Q]), {"content-type": "application/json"}, 400),
            (orjson.dumps({"query": 5}), {"content-type": "application/json"}, 400),
            (orjson.dumps({"query": Q, "cache": "nope"}), {"content-type": "application/json"}, 400),
            (orjson.dumps({"query": Q, "history": "x"}), {"content-type": "application/json"}, 400),
            (orjson.dumps({"query": Q + " " * 200_000}), {"content-type": "application/json"}, 413),
            (b"", {"content-type": "application/json"}, 400),
        ]
        for raw, headers, status in bad:
            r = await c.post("/v1/query", content=raw, headers=headers)
            assert r.status_code == status, (raw[:40], r.text)
            assert "error" in r.json()
        assert (await c.post("/v1/query", json={"query": Q, "cache": "bypass"})).json()["cache"]["kind"] == "bypass"
        streamed = await c.post("/v1/query", json={"query": Q, "stream": True})
        assert streamed.headers["content-type"].startswith("text/event-stream")
        hist = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        assert (await c.post("/v1/query", json={"query": Q, "history": hist})).status_code == 200
        assert fast_path(app).served == 0


async def test_rate_limits_and_metrics_see_fast_path_hits(tmp_path: Path) -> None:
    async with client(tmp_path, rate_limit_per_key_rpm=60, rate_limit_burst=3) as (c, app, _):
        codes = [(await c.post("/v1/query", json={"query": Q}, headers=key("key-a"))).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]  # hits are charged like any request
        assert fast_path(app).served == 2
        text = (await c.get("/metrics")).text
        assert 'ragline_http_request_duration_seconds_count{method="POST",route="/v1/query",status="200"}' in text
        assert 'ragline_answers_total{outcome="exact"}' in text


async def test_chunked_body_and_early_disconnect(tmp_path: Path) -> None:
    async with client(tmp_path) as (c, app, _):
        await c.post("/v1/query", json={"query": Q})
        raw = orjson.dumps({"query": Q})
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/v1/query", "raw_path": b"/v1/query", "root_path": "", "query_string": b"",
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
            "headers": [(b"content-type", b"application/json")],
        }  # fmt: skip

        async def run(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
            sent: list[dict[str, Any]] = []
            queue = list(messages)

            async def receive() -> dict[str, Any]:
                return queue.pop(0) if queue else {"type": "http.disconnect"}

            async def send(msg: dict[str, Any]) -> None:
                sent.append(msg)

            await app(dict(scope), receive, send)
            return sent

        parts = [raw[:10], raw[10:]]
        sent = await run([{"type": "http.request", "body": p, "more_body": i == 0} for i, p in enumerate(parts)])
        assert sent[0]["status"] == 200 and b'"kind":"exact"' in sent[1]["body"]
        assert fast_path(app).served == 1
        assert await run([{"type": "http.disconnect"}]) == []  # gone before its body: nothing sent


def test_fastapi_native_telemetry_off_unless_opentelemetry_is_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = Settings(data_dir=tmp_path / "data")
    for k in [k for k in os.environ if k.startswith("OTEL_")]:
        monkeypatch.delenv(k)
    monkeypatch.delenv("FASTAPI_OTEL_AUTO_CONFIGURE", raising=False)
    off: Any = create_app(s, AsyncRAG(s, embedder=HashEmbedder()))
    if not hasattr(off, "_telemetry"):
        pytest.skip("this FastAPI has no native telemetry")
    assert not off._telemetry["tracing"] and not off._telemetry["metrics"] and not off._telemetry["logs"]
    monkeypatch.setenv("OTEL_SERVICE_NAME", "ragline")
    on: Any = create_app(s, AsyncRAG(s, embedder=HashEmbedder()))
    assert on._telemetry["tracing"] and on._telemetry["metrics"]


async def test_bodies_the_route_must_see_are_not_served_here(tmp_path: Path) -> None:
    """A conversation turn, a misspelt field, a coerced ``k`` or ``timings`` go to the route (which
    answers a turn or a 400), never as an exact hit of the plain question."""
    async with client(tmp_path) as (c, app, _):
        await c.post("/v1/query", json={"query": Q}, headers=key("key-a"))
        fp = fast_path(app)
        for body, status in (
            ({"query": Q, "k": True}, 400),
            ({"query": Q, "k": "5"}, 400),
            ({"query": Q, "conversation_idd": "c1"}, 400),
            ({"query": Q, "conversation_id": "c1"}, 200),
        ):
            r = await c.post("/v1/query", json=body, headers=key("key-a"))
            assert r.status_code == status, (body, r.text)
        assert fp.served == 0
