"""The gateway inside ragline: the pipeline, the server route, and the remote embedder."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from ragline.config import EmbedderSettings, GatewaySettings, Settings, UpstreamSettings
from ragline.embed.cached import CachedEmbedder
from ragline.embed.remote import OpenAIEmbedder
from ragline.errors import ConfigError
from ragline.pipeline import AsyncRAG
from ragline.server.app import create_app
from ragline.testing import FakeUpstream, HashEmbedder
from ragline.types import Document

DOCS = [
    Document("paris", "Paris is the capital of France. The Eiffel Tower opened in 1889.", "Paris"),
    Document("tea", "Green tea contains caffeine and antioxidants called catechins.", "Tea"),
]


@pytest.fixture(scope="module")
def two() -> Iterator[tuple[FakeUpstream, FakeUpstream]]:
    with FakeUpstream() as a, FakeUpstream() as b:
        yield a, b


@pytest.fixture
def fakes(two: tuple[FakeUpstream, FakeUpstream]) -> tuple[FakeUpstream, FakeUpstream]:
    for f in two:
        f.reset()
    return two


def settings(tmp_path: Path, fakes: tuple[FakeUpstream, FakeUpstream], **server: object) -> Settings:
    ups = [{"base_url": f.url, "model": "chat", "name": f"u{i}"} for i, f in enumerate(fakes)]
    return Settings(
        data_dir=tmp_path / "data",
        cache={"enabled": True, "redis_url": None, "semantic": False},
        llm={"provider": "gateway", "model": "chat", "gateway": {"upstreams": ups, "strategy": "least_busy"}},
        server=server,
    )


async def test_cache_hits_never_reach_the_gateway(tmp_path: Path, fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    async with AsyncRAG(settings(tmp_path, fakes), embedder=HashEmbedder()) as rag:
        await rag.ingest(DOCS)
        first = await rag.ask("When did the Eiffel Tower open?")
        assert first.upstream in ("u0", "u1") and first.cache.kind == "miss"
        for _ in range(5):
            again = await rag.ask("When did the Eiffel Tower open?")
            assert again.cache.kind == "exact" and again.upstream == first.upstream  # the stored answer says who
        snap = (await rag.upstreams())["llm"]
        assert sum(r["requests"] for r in snap["upstreams"]) == 1
        assert all(r["in_flight"] == 0 for r in snap["upstreams"])  # least-busy counts never drift
        assert sum(f.calls for f in fakes) == 1
        events = [e async for e in await rag.ask_stream("Which drink has catechins?")]
        assert events[-1][1]["upstream"] in ("u0", "u1")


async def test_upstreams_route_and_metrics(tmp_path: Path, fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    app = create_app(settings(tmp_path, fakes), AsyncRAG(settings(tmp_path, fakes), embedder=HashEmbedder()))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        await c.post("/v1/documents", json={"documents": [{"id": d.id, "text": d.text} for d in DOCS]})
        r = await c.post("/v1/query", json={"query": "When did the Eiffel Tower open?"})
        assert r.status_code == 200 and r.json()["upstream"] in ("u0", "u1")
        view = (await c.get("/v1/upstreams")).json()
        assert view["embedder"] is None
        llm = view["llm"]
        assert llm["strategy"] == "least_busy" and llm["state"] == "local"
        assert {u["name"] for u in llm["upstreams"]} == {"u0", "u1"}
        assert {"breaker", "rate_factor", "in_flight", "pool", "latency_ms", "limits"} <= set(llm["upstreams"][0])
        text = (await c.get("/metrics")).text
        for name in ("ragline_upstream_requests_total", "ragline_upstream_breaker_state",
                         "ragline_upstream_rate_factor", "ragline_upstream_pool_connections"):  # fmt: skip
            assert name in text


async def test_upstreams_route_needs_an_admin_key_when_admin_keys_exist(
    tmp_path: Path, fakes: tuple[FakeUpstream, FakeUpstream]
) -> None:
    s = settings(tmp_path, fakes, admin_keys=["adm"])
    app = create_app(s, AsyncRAG(s, embedder=HashEmbedder()))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        assert (await c.get("/v1/upstreams")).status_code == 401
        assert (await c.get("/v1/upstreams", headers={"x-api-key": "adm"})).status_code == 200


# ------------------------------------------------------------------------------------------ remote embedder


def remote(fakes: tuple[FakeUpstream, ...], **kw: object) -> OpenAIEmbedder:
    ups = tuple(UpstreamSettings(base_url=f.url, model="emb", name=f"e{i}") for i, f in enumerate(fakes))
    return OpenAIEmbedder(
        EmbedderSettings(provider="openai", model="emb", gateway=GatewaySettings(upstreams=ups), **kw)
    )  # type: ignore[arg-type]


async def test_remote_embedder_probes_its_width_and_normalises(fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    fakes[0].configure(embedding_dim=48)
    fakes[1].configure(embedding_dim=48)
    emb = remote(fakes)
    assert emb.dim == 48 and emb.id == "openai:emb"
    v = await emb.aembed(["a", "b", "c"])
    assert v.shape == (3, 48) and np.allclose(np.linalg.norm(v, axis=1), 1.0)
    same = await emb.aembed(["b"])
    assert np.allclose(same[0], v[1])  # input order kept
    await emb.aclose()


async def test_remote_embedder_splits_big_lists_and_fails_over(fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    emb = remote(fakes, dim=384, batch_size=4)
    fakes[0].configure(failure_rate=1.0, failure_kind="503")
    v = await emb.aembed([f"text {i}" for i in range(10)])
    assert v.shape == (10, 384)
    assert fakes[1].route_calls("embeddings") == 3  # 4 + 4 + 2
    await emb.aclose()


async def test_micro_batching_turns_concurrent_queries_into_one_call(fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    fakes[0].configure(latency_ms=30)
    emb = remote(fakes[:1], dim=384)
    cached = CachedEmbedder(emb, None, max_batch=64)
    vecs = await asyncio.gather(*(cached.embed_query("t", f"question {i}") for i in range(32)))
    assert len(vecs) == 32 and all(v.shape == (384,) for v in vecs)
    assert fakes[0].route_calls("embeddings") <= 2  # the first alone, the other 31 together
    await cached.aclose()
    await emb.aclose()


def test_sync_embed_without_a_loop(fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    emb = remote(fakes[:1], dim=384)
    assert emb.embed(["x", "y"]).shape == (2, 384)


def test_remote_embedder_needs_an_endpoint() -> None:
    with pytest.raises(ConfigError, match=r"embedder\.base_url or embedder\.gateway\.upstreams"):
        OpenAIEmbedder(EmbedderSettings(provider="openai"))


def test_embedder_provider_openai_from_settings(fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    from ragline import plugins

    s = Settings(embedder={"provider": "openai", "base_url": fakes[0].url, "model": "emb", "dim": 384})
    emb = plugins.load("ragline.embedders", s.embedder.provider)(s.embedder)
    assert emb.dim == 384 and emb.gateway.upstreams[0].base_url == fakes[0].url


def test_gateways_share_the_cache_redis_by_default() -> None:
    s = Settings(cache={"redis_url": "redis://127.0.0.1:1/0"}, llm={"provider": "gateway"})
    assert s.llm.gateway.redis_url == "redis://127.0.0.1:1/0"
    assert s.embedder.gateway.redis_url == "redis://127.0.0.1:1/0"
    own = Settings(cache={"redis_url": "redis://a/0"}, llm={"gateway": {"redis_url": "redis://b/0"}})
    assert own.llm.gateway.redis_url == "redis://b/0"
