"""Answers generated through the OpenAI-compatible client: fake upstream and real llama.cpp."""

from __future__ import annotations

from collections.abc import Callable

import orjson
from fastapi.testclient import TestClient

from ragline.config import Settings
from ragline.embed.local import LocalEmbedder
from ragline.pipeline import AsyncRAG
from ragline.server.app import create_app
from ragline.testing import FakeUpstream
from tests.fixtures.upstream import LlamaServer
from tests.integration.test_pipeline import DOCS


async def test_ask_through_fake_upstream_sends_sources_and_history(
    make_settings: Callable[..., Settings], embedder: LocalEmbedder, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.configure(reply="The tower opened in 1889 [1].")
    settings = make_settings(
        llm={"provider": "openai", "base_url": fake_upstream.url, "model": "fake-model", "api_key": "sk-test-secret"}
    )
    async with AsyncRAG(settings, embedder=embedder) as rag:
        await rag.ingest(DOCS)
        answer = await rag.ask(
            "When did the Eiffel Tower open?",
            history=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        )
    assert answer.text == "The tower opened in 1889 [1]."
    assert answer.sources[0].doc_id == "paris"
    assert answer.usage.completion_tokens > 0
    req = fake_upstream.last_request
    assert req is not None and req["model"] == "fake-model"
    msgs = req["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert "[1] Paris" in msgs[-1]["content"] and "Eiffel Tower" in msgs[-1]["content"]
    assert fake_upstream.route_calls("chat") == 1


def test_stream_over_http_through_fake_upstream(
    make_settings: Callable[..., Settings], embedder: LocalEmbedder, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.configure(reply="Cats sleep sixteen hours [1].", tps=500)
    settings = make_settings(llm={"provider": "openai", "base_url": fake_upstream.url, "model": "m"})
    with TestClient(create_app(settings, AsyncRAG(settings, embedder=embedder))) as c:
        c.post("/v1/documents", json={"documents": [{"id": d.id, "text": d.text, "title": d.title} for d in DOCS]})
        r = c.post("/v1/query", json={"query": "How long do cats sleep?", "stream": True})
    events = [(b.split("\n")[0][7:], orjson.loads(b.split("\n")[1][6:])) for b in r.text.strip().split("\n\n")]
    assert events[0][0] == "sources" and events[-1][0] == "done"
    assert "".join(d["text"] for e, d in events if e == "delta") == "Cats sleep sixteen hours [1]."


def test_upstream_failure_is_a_clean_502(
    make_settings: Callable[..., Settings], embedder: LocalEmbedder, fake_upstream: FakeUpstream
) -> None:
    settings = make_settings(llm={"provider": "openai", "base_url": fake_upstream.url, "model": "m", "retries": 1})
    fake_upstream.fail_next("500", count=5)
    with TestClient(create_app(settings, AsyncRAG(settings, embedder=embedder)), raise_server_exceptions=False) as c:
        c.post("/v1/documents", json={"documents": [{"id": "a", "text": "Cats sleep."}]})
        r = c.post("/v1/query", json={"query": "cats?"})
        assert r.status_code == 502 and "500" in r.json()["error"]["message"]
        assert c.get("/healthz").status_code == 200


async def test_ask_through_real_llama_cpp(
    make_settings: Callable[..., Settings], embedder: LocalEmbedder, llama_server: LlamaServer
) -> None:
    settings = make_settings(
        llm={"provider": "openai", "base_url": llama_server.url, "model": llama_server.model, "max_tokens": 24},
        context={"token_budget": 300},
    )
    async with AsyncRAG(settings, embedder=embedder) as rag:
        await rag.ingest(DOCS)
        answer = await rag.ask("What is the capital of France?")
        assert answer.text.strip() and answer.usage.completion_tokens > 0
        assert answer.sources[0].doc_id == "paris"
        events = [e async for e in await rag.ask_stream("What is the capital of France?")]
    assert events[0][0] == "sources" and events[-1][0] == "done"
    assert any(e == "delta" for e, _ in events)
