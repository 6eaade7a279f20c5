"""The HTTP API end to end: documents, search, query (JSON and SSE), ops routes, bad input."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import orjson
import pytest
from fastapi.testclient import TestClient

from ragline.config import Settings
from ragline.embed.local import LocalEmbedder
from ragline.pipeline import AsyncRAG
from ragline.server.app import create_app

DOCS = {
    "documents": [
        {"id": "cats", "title": "Cats", "text": "Cats are small mammals. Domestic cats sleep sixteen hours a day."},
        {
            "id": "paris",
            "title": "Paris",
            "text": "Paris is the capital of France. The Eiffel Tower opened in 1889.",
            "metadata": {"lang": "en"},
        },
    ]
}


@pytest.fixture
def client(make_settings: Callable[..., Settings], embedder: LocalEmbedder) -> Iterator[TestClient]:
    settings = make_settings(
        server={"api_keys": {"key-b": "tenant-b"}, "admin_keys": ["admin"]},
        limits={"max_request_bytes": 200_000, "max_document_bytes": 50_000},
    )
    app = create_app(settings, AsyncRAG(settings, embedder=embedder))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def parse_sse(body: bytes) -> list[tuple[str, dict[str, object]]]:
    events = []
    for block in body.decode().strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], orjson.loads(lines["data"])))
    return events


def test_documents_search_query_delete(client: TestClient) -> None:
    r = client.post("/v1/documents", json=DOCS)
    assert r.status_code == 200, r.text
    assert r.json()["added"] == 2
    r = client.post("/v1/search", json={"query": "capital of France", "k": 2, "timings": True})
    assert r.status_code == 200
    hits = r.json()["hits"]
    assert hits[0]["doc_id"] == "paris" and hits[0]["metadata"] == {"lang": "en"}
    assert {"embed", "retrieve"} <= set(r.json()["timings"])
    r = client.post("/v1/query", json={"query": "When did the Eiffel Tower open?"})
    assert r.status_code == 200
    body = r.json()
    assert "1889" in body["answer"] and body["sources"][0]["doc_id"] == "paris"
    assert set(body) >= {"answer", "sources", "usage", "timings", "cache"}
    assert client.get("/v1/documents").json()["ids"] == ["cats", "paris"]
    r = client.delete("/v1/documents/paris")
    assert r.status_code == 200 and r.json()["chunks_removed"] == 1
    assert client.delete("/v1/documents/paris").status_code == 404
    hits = client.post("/v1/search", json={"query": "Eiffel Tower", "k": 5}).json()["hits"]
    assert all(h["doc_id"] != "paris" for h in hits)


def test_query_stream_events_in_order(client: TestClient) -> None:
    client.post("/v1/documents", json=DOCS)
    r = client.post("/v1/query", json={"query": "How long do cats sleep?", "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.content)
    names = [e for e, _ in events]
    assert names[0] == "sources" and names[-1] == "done"
    assert set(names[1:-1]) == {"delta"}
    text = "".join(str(d["text"]) for e, d in events if e == "delta")
    assert "sixteen" in text
    assert events[-1][1]["usage"]["completion_tokens"] > 0  # type: ignore[index]


def test_tenant_from_api_key(client: TestClient) -> None:
    client.post("/v1/documents", json=DOCS)
    r = client.post("/v1/search", json={"query": "cats", "k": 5}, headers={"Authorization": "Bearer key-b"})
    assert r.status_code == 200 and r.json()["hits"] == []
    r = client.post("/v1/search", json={"query": "cats"}, headers={"X-API-Key": "wrong"})
    assert r.status_code == 401


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "needle"),
    [
        (
            "post",
            "/v1/query",
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            400,
            "not valid JSON",
        ),
        ("post", "/v1/query", {"json": {"query": ""}}, 400, "query is empty"),
        ("post", "/v1/query", {"json": {"nope": 1}}, 400, "'query' is required"),
        ("post", "/v1/query", {"json": ["a"]}, 400, "JSON object"),
        ("post", "/v1/query", {"json": {"query": "x" * 5000}}, 413, "limit"),
        ("post", "/v1/query", {"json": {"query": "cats", "k": 0}}, 400, "k must be"),
        ("post", "/v1/query", {"json": {"query": "cats", "k": "ten"}}, 400, "k must be"),
        ("post", "/v1/query", {"json": {"query": "cats", "history": "x"}}, 400, "history"),
        ("post", "/v1/search", {"json": {"query": "cats", "k": 1000}}, 400, "k must be"),
        ("post", "/v1/search", {"json": {"k": 3}}, 422, "query"),
        ("post", "/v1/documents", {"json": {"documents": []}}, 422, "documents"),
        ("post", "/v1/documents", {"json": {"documents": [{"id": "a", "text": "   "}]}}, 400, "empty"),
        ("post", "/v1/documents", {"json": {"documents": [{"id": "a", "text": "x" * 60_000}]}}, 413, "limit"),
        (
            "post",
            "/v1/documents",
            {"content": b"x" * 300_000, "headers": {"content-type": "application/json"}},
            413,
            "limit",
        ),
        ("delete", "/v1/documents/nope", {}, 404, "nope"),
    ],
)
def test_bad_input_gets_clear_4xx_and_server_survives(
    client: TestClient, method: str, path: str, kwargs: dict[str, object], status: int, needle: str
) -> None:
    client.post("/v1/documents", json=DOCS)
    r = getattr(client, method)(path, **kwargs)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]
    assert client.get("/healthz").status_code == 200
    assert client.post("/v1/search", json={"query": "cats", "k": 1}).json()["hits"][0]["doc_id"] == "cats"


def test_ops_routes(client: TestClient) -> None:
    client.post("/v1/documents", json=DOCS)
    client.post("/v1/query", json={"query": "cats?"})
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    text = client.get("/metrics").text
    assert 'ragline_stage_duration_seconds_count{stage="retrieve"}' in text
    assert 'ragline_http_request_duration_seconds_count{method="POST",route="/v1/query",status="200"}' in text
    assert "ragline_documents_indexed 2.0" in text
    assert client.get("/openapi.json").json()["paths"]["/v1/query"]["post"]["requestBody"]
    assert client.get("/docs").status_code == 200
