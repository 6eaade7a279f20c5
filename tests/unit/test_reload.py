"""Hot reload (ragline.server.reload): the swap, draining, fingerprints, refusals and the admin route.

Pipelines use HashEmbedder (no model) and the extractive LLM; a reload's settings come from a loader
function the test controls (a server reads ``RAGLINE_CONFIG`` + the environment instead).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from ragline.config import Settings
from ragline.errors import ConfigError, InvalidInput
from ragline.pipeline import AsyncRAG
from ragline.server.app import create_app
from ragline.server.reload import Live, Routing, changed_paths, pin_restart_only
from ragline.testing import HashEmbedder
from ragline.types import Document

DOCS = [
    Document("paris", "Paris is the capital of France. The Eiffel Tower opened in 1889.", "Paris"),
    Document("tea", "Green tea contains caffeine and antioxidants called catechins.", "Tea"),
]
Q = "When did the Eiffel Tower open?"


@pytest.fixture
def make(tmp_path: Path) -> Callable[..., Settings]:
    def settings(**over: Any) -> Settings:
        base: dict[str, Any] = {"data_dir": tmp_path / "data", "cache": {"enabled": True, "redis_url": None}}
        return Settings(**{**base, **over})

    return settings


@pytest.fixture
async def live(make: Callable[..., Settings]) -> AsyncIterator[tuple[Live, list[Settings]]]:
    """A started pipeline in a Live holder; append to the list to change what the next reload reads."""
    first = make()
    configs = [first]
    rag = await AsyncRAG(first, embedder=HashEmbedder()).start()
    await rag.ingest(DOCS)
    holder = Live(rag, first, lambda: configs[-1], drain_s=5)
    yield holder, configs
    await holder.aclose()


def test_changed_paths_names_settings_not_values(make: Callable[..., Settings]) -> None:
    a = make()
    b = make(llm={"model": "m2", "api_key": "sk-secret"}, server={"port": 9999})
    assert changed_paths(a, b) == ["llm.api_key", "llm.model", "server.port"]
    assert changed_paths(a, make()) == []


def test_pin_restart_only_keeps_the_running_values(make: Callable[..., Settings], tmp_path: Path) -> None:
    a = make()
    b = make(server={"port": 9999, "workers": 4}, data_dir=tmp_path / "elsewhere",
             embedder={"model": "other", "batch_size": 8}, llm={"model": "m2"})  # fmt: skip
    p = pin_restart_only(a, b)
    assert (p.server.port, p.server.workers, p.data_dir, p.embedder.model) == (8080, 1, a.data_dir, a.embedder.model)
    assert p.embedder.batch_size == 8 and p.llm.model == "m2"  # the reloadable ones apply


async def test_reload_swaps_and_a_new_model_never_gets_the_old_cached_answer(
    live: tuple[Live, list[Settings]], make: Callable[..., Settings]
) -> None:
    holder, configs = live
    old = holder.current.rag
    assert (await old.ask(Q)).cache.kind == "miss"
    assert (await old.ask(Q)).cache.kind == "exact"
    configs.append(make(llm={"model": "extractive-b", "extractive_sentences": 2}, server={"port": 1234}))
    report = await holder.reload("test")
    assert report["generation"] == 2 and report["fingerprint"]["changed"] is True
    assert "llm.model" in report["changed"] and report["restart_required"] == ["server.port"]
    assert report["reused"] == ["embedder", "store"] and report["swap_ms"] < 100
    new = holder.current.rag
    assert new is not old and new.store is old.store and new.settings.server.port == 8080
    answer = await new.ask(Q)
    assert answer.cache.kind == "miss" and answer.model == "extractive:2"  # computed by the new LLM
    assert (await new.ask(Q)).cache.kind == "exact"
    await holder.retiring()
    assert not old.ready and new.ready  # the old one closed once idle; the shared store still open
    assert (await new.search("Eiffel Tower"))[0].doc_id == "paris"


async def test_same_settings_reload_keeps_the_fingerprint_and_the_cache(live: tuple[Live, list[Settings]]) -> None:
    holder, _ = live
    await holder.current.rag.ask(Q)
    report = await holder.reload("test")
    assert report["changed"] == [] and report["fingerprint"]["changed"] is False
    assert report["reused"] == ["embedder", "llm", "store"]
    assert (await holder.current.rag.ask(Q)).cache.kind == "exact"  # from L3: same key under the same settings


async def test_invalid_config_is_refused_and_the_old_pipeline_keeps_serving(
    live: tuple[Live, list[Settings]], make: Callable[..., Settings]
) -> None:
    holder, configs = live
    before = holder.current

    def broken() -> Settings:
        raise ConfigError("invalid setting llm.temperature: Input should be less than or equal to 2")

    holder._load = broken
    with pytest.raises(InvalidInput, match=r"reload refused.*llm\.temperature"):
        await holder.reload("test")
    assert holder.current is before and before.rag.ready
    holder._load = lambda: configs[-1]
    configs.append(make(llm={"provider": "no-such-llm"}))  # valid settings, a component that cannot be built
    with pytest.raises(InvalidInput, match="no-such-llm"):
        await holder.reload("test")
    assert holder.current is before and (await before.rag.ask(Q)).text


async def test_in_flight_requests_finish_on_the_old_pipeline(
    live: tuple[Live, list[Settings]], make: Callable[..., Settings]
) -> None:
    holder, configs = live
    release = asyncio.Event()
    seen: list[Settings] = []
    proxy = holder.proxy()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(proxy.settings)  # the proxy resolves to the generation the request arrived on
        if scope.get("slow"):
            await release.wait()
            seen.append(proxy.settings)

    routing = Routing(app, holder)
    old = holder.current
    slow = asyncio.create_task(routing({"type": "http", "slow": True}, None, None))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    assert old.in_flight == 1
    configs.append(make(llm={"model": "m2"}))
    await holder.reload("test")
    await routing({"type": "http"}, None, None)  # type: ignore[arg-type]  # a request after the swap
    await asyncio.sleep(0.05)
    assert old.rag.ready, "closed while a request still ran on it"
    release.set()
    await slow
    await holder.retiring()
    new = holder.current
    assert seen == [old.settings, new.settings, old.settings]
    assert old.rag.settings is old.settings and new.settings.llm.model == "m2"
    assert not old.rag.ready and new.rag.ready and old.in_flight == 0


async def test_admin_reload_route_needs_an_admin_key(make: Callable[..., Settings]) -> None:
    s = make(server={"api_keys": {"tenant-key": "acme"}, "admin_keys": ["admin-key"]})
    configs = [s]
    rag = AsyncRAG(s, embedder=HashEmbedder())
    app = create_app(s, rag, reload=lambda: configs[-1])
    live: Live = app.state.live
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            assert (await c.post("/v1/admin/reload")).status_code == 401
            assert (await c.post("/v1/admin/reload", headers={"Authorization": "Bearer tenant-key"})).status_code == 403
            admin = {"Authorization": "Bearer admin-key"}
            configs.append(make(server=s.server.model_dump(), llm={"model": "m2"}))
            r = await c.post("/v1/admin/reload", headers=admin)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["generation"] == 2 and body["changed"] == ["llm.model"] and body["restart_required"] == []
            configs.append(make(server=s.server.model_dump(), llm={"provider": "no-such-llm"}))
            r = await c.post("/v1/admin/reload", headers=admin)
            assert r.status_code == 400 and "no-such-llm" in r.json()["error"]["message"]
            status = (await c.get("/v1/admin/reload", headers=admin)).json()
            assert status["generation"] == 2 and status["last"]["changed"] == ["llm.model"]
            q = await c.post("/v1/query", json={"query": Q})
            assert q.status_code == 200
        await live.retiring()


async def test_a_write_on_the_draining_pipeline_does_not_leave_the_new_l1_stale(
    live: tuple[Live, list[Settings]], make: Callable[..., Settings]
) -> None:
    holder, configs = live
    release = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await release.wait()

    old = holder.current
    slow = asyncio.create_task(Routing(app, holder)({"type": "http"}, None, None))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    configs.append(make(llm={"extractive_sentences": 2}))
    await holder.reload("test")
    new = holder.current.rag
    assert "1889" in (await new.ask(Q)).text
    assert (await new.ask(Q)).cache.kind == "exact"  # in the new L1
    changed = Document("paris", "Paris is the capital of France. The Eiffel Tower opened in 1890.", "Paris")
    await old.rag.ingest([changed])  # a write still running on the old pipeline after the swap
    release.set()
    await slow
    await holder.retiring()
    assert "1890" in (await new.ask(Q)).text
