"""Per-request profiling (ragline.server.profiling): admin only, pyinstrument tree + tracemalloc, 501 without it."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from ragline.config import Settings
from ragline.pipeline import AsyncRAG
from ragline.server.app import create_app
from ragline.testing import HashEmbedder
from ragline.types import Document

ADMIN = {"Authorization": "Bearer admin-key"}
TENANT = {"Authorization": "Bearer tenant-key"}
Q = {"query": "When did the Eiffel Tower open?"}


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    s = Settings(
        data_dir=tmp_path / "data",
        cache={"enabled": True, "redis_url": None},
        server={"api_keys": {"tenant-key": "default"}, "admin_keys": ["admin-key"]},
    )
    rag = AsyncRAG(s, embedder=HashEmbedder())
    app = create_app(s, rag)
    async with app.router.lifespan_context(app):
        await rag.ingest([Document("paris", "The Eiffel Tower in Paris opened in 1889.", "Paris")])
        await rag.ask("Where is the Eiffel Tower?")  # warm: first-use loading under tracemalloc takes seconds
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            yield c


async def test_admin_gets_a_profile_and_allocations(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/query", json={**Q, "profile": True}, headers=ADMIN)
    assert r.status_code == 200, r.text
    body = r.json()
    assert "1889" in body["answer"] and body["cache"]["kind"] == "miss"
    p = body["profile"]
    assert p["format"] == "text" and p["wall_ms"] > 0 and "Samples:" in p["tree"]
    tm = p["tracemalloc"]
    assert tm["traced_peak_kib"] > 0 and all({"where", "size_kib", "count"} <= set(a) for a in tm["top"])
    html = (await client.post("/v1/query", json={**Q, "profile": "html"}, headers=ADMIN)).json()["profile"]
    assert html["format"] == "html" and "<html" in html["tree"].lower()
    plain = await client.post("/v1/query", json=Q, headers=ADMIN)  # no flag: no profile, an exact hit
    assert "profile" not in plain.json() and plain.json()["cache"]["kind"] == "exact"


async def test_tenants_never_get_a_profile(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/query", json={**Q, "profile": True}, headers=TENANT)
    assert r.status_code == 403 and "admin" in r.json()["error"]["message"]
    assert (await client.post("/v1/query", json={**Q, "profile": True})).status_code == 401
    ok = await client.post("/v1/query", json={**Q, "profile": False}, headers=TENANT)
    assert ok.status_code == 200 and "profile" not in ok.json()


async def test_bad_flags_are_400_and_a_missing_pyinstrument_is_501(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = await client.post("/v1/query", json={**Q, "profile": "flamegraph"}, headers=ADMIN)
    assert r.status_code == 400 and "text, html, json" in r.json()["error"]["message"]
    r = await client.post("/v1/query", json={**Q, "profile": True, "stream": True}, headers=ADMIN)
    assert r.status_code == 400 and "stream" in r.json()["error"]["message"]
    monkeypatch.setitem(sys.modules, "pyinstrument", None)  # import fails as if not installed
    r = await client.post("/v1/query", json={**Q, "profile": True}, headers=ADMIN)
    assert r.status_code == 501 and "ragline[profile]" in r.json()["error"]["message"]
