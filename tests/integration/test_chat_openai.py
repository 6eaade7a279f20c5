"""The OpenAI-compatible facade and conversations with the official ``openai`` client, over real HTTP
(uvicorn on a 127.0.0.1 port, the real MiniLM embedder, the extractive answerer, L1 + L3 caches).

Evidence of issue 11: answers with sources streamed and not; a repeated request is a cache hit
(``x-ragline-cache`` header and the ``ragline.cache`` extension); bad requests raise the client's usual
exceptions from OpenAI-shaped error bodies; two conversations asking "tell me more about that" after
different first questions each get their own topic's sources and neither is served the other's answer.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from ragline.config import Settings
from ragline.embed.local import LocalEmbedder
from ragline.pipeline import AsyncRAG
from ragline.server.app import create_app
from tests.fixtures.http import ThreadedServer

DOCS = [
    ("bm25-basics", "BM25", "BM25 is a ranking function that search engines use to score documents for a "
     "keyword query. It weighs how often a query term appears in a document against the document's length."),
    ("bm25-params", "BM25 parameters", "The BM25 parameter k1 controls term frequency saturation and the "
     "parameter b controls document length normalisation; typical values are k1 = 1.2 and b = 0.75."),
    ("eiffel-history", "Eiffel Tower", "The Eiffel Tower is a wrought-iron lattice tower in Paris. It opened "
     "in 1889 as the entrance arch of the World's Fair and was designed by Gustave Eiffel's company."),
    ("eiffel-facts", "Eiffel Tower facts", "The Eiffel Tower is 330 metres tall and was the tallest man-made "
     "structure in the world until 1930. Millions of people visit the tower every year."),
    ("tea", "Green tea", "Green tea is made from unoxidised leaves and contains caffeine and catechins."),
    ("volcano", "Volcanoes", "A volcano is a rupture in the crust of a planet where lava and gases escape."),
    ("cats", "Cats", "Domestic cats sleep for twelve to sixteen hours a day and purr when content."),
]  # fmt: skip
KEY = "key-a"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, embedder: LocalEmbedder) -> Iterator[str]:
    tmp: Path = tmp_path_factory.mktemp("chat")
    settings = Settings(
        data_dir=tmp / "data",
        cache={"enabled": True, "redis_url": None},
        server={"api_keys": {KEY: "tenant-a", "key-b": "tenant-b"}},
    )
    app = create_app(settings, AsyncRAG(settings, embedder=embedder))
    with ThreadedServer(app) as srv:
        docs = [{"id": i, "title": t, "text": x} for i, t, x in DOCS]
        for key in (KEY, "key-b"):
            r = httpx.post(f"{srv.url}/v1/documents", json={"documents": docs}, headers={"x-api-key": key}, timeout=60)
            assert r.status_code == 200, r.text
        yield srv.url


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def sources_of(obj: Any) -> list[dict[str, Any]]:
    extra = obj.model_extra or {}
    out: list[dict[str, Any]] = extra["sources"]
    return out


def topics(text: str, sources: list[dict[str, Any]]) -> set[str]:
    """Topics of the two best-scored sources (RRF; the context is in MMR order) and of every source the text
    cites (the answer, without the appended list of sources)."""
    cited = {int(n) for n in re.findall(r"\[(\d+)\]", text.split("\n\nSources:\n")[0])}
    best = {s["index"] for s in sorted(sources, key=lambda s: -s["score"])[:2]}
    return {s["doc_id"].split("-")[0] for s in sources if s["index"] in best | cited}


def test_models(client: openai.OpenAI) -> None:
    assert "ragline" in [m.id for m in client.models.list()]


def test_non_stream_answer_with_sources_then_a_cache_hit(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "When did the Eiffel Tower open?"}]
    raw = client.chat.completions.with_raw_response.create(model="ragline", messages=messages)
    first = raw.parse()
    text = first.choices[0].message.content or ""
    assert "1889" in text and "[1]" in text and "Sources:\n[1]" in text
    assert first.choices[0].finish_reason == "stop" and first.usage is not None and first.usage.total_tokens > 0
    sources = sources_of(first)
    assert sources[0]["doc_id"].startswith("eiffel") and sources[0]["index"] == 1
    assert raw.headers["x-ragline-cache"] == "miss"
    raw2 = client.chat.completions.with_raw_response.create(model="ragline", messages=messages)
    again = raw2.parse()
    assert raw2.headers["x-ragline-cache"] == "exact; tier=l1"
    assert (again.model_extra or {})["ragline"]["cache"]["kind"] == "exact"
    assert again.choices[0].message.content == text and sources_of(again) == sources


def test_stream_answer_with_sources_then_a_cache_hit(client: openai.OpenAI) -> None:
    def run() -> tuple[str, list[Any]]:
        chunks = list(
            client.chat.completions.create(
                model="ragline",
                messages=[{"role": "user", "content": "What do the BM25 parameters k1 and b control?"}],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)
        return text, chunks

    text, chunks = run()
    final = next(c for c in chunks if c.choices and c.choices[0].finish_reason == "stop")
    assert sources_of(final)[0]["doc_id"].startswith("bm25") and "k1" in text and "[1]" in text
    assert (final.model_extra or {})["ragline"]["cache"]["kind"] == "miss"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    text2, chunks2 = run()
    final2 = next(c for c in chunks2 if c.choices and c.choices[0].finish_reason == "stop")
    assert (final2.model_extra or {})["ragline"]["cache"]["kind"] == "exact"
    assert text2 == text and sources_of(final2) == sources_of(final)


def test_bad_requests_raise_openai_errors(client: openai.OpenAI, server: str) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="ragline", messages=[])
    assert bad.value.param == "messages" and bad.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="ragline", messages=[{"role": "user", "content": "q"}], n=2)
    assert bad.value.param == "n"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="ragline", messages=[{"role": "user", "content": "q"}], extra_body={"conversation": "x"}
        )
    assert bad.value.param == "conversation" and "unrecognized request argument" in bad.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="ragline", messages=[{"role": "user", "content": "q"}], extra_body={"conversation_id": "bad id!"}
        )
    assert "conversation_id must be" in bad.value.message
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "q"}])
    assert missing.value.param == "model"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.APIStatusError) as big:
        client.chat.completions.create(model="ragline", messages=[{"role": "user", "content": "x" * 3000}])
    assert big.value.status_code == 413 and "characters" in big.value.message


def ask(client: openai.OpenAI, cid: str, question: str) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    out = client.chat.completions.create(
        model="ragline", messages=[{"role": "user", "content": question}], extra_body={"conversation_id": cid}
    )
    return out.choices[0].message.content or "", sources_of(out), (out.model_extra or {})["ragline"]


def test_follow_ups_in_two_conversations(client: openai.OpenAI, server: str) -> None:
    """Evidence 1: the same follow-up in two conversations retrieves each one's own topic."""
    ask(client, "evidence-bm25", "What is BM25?")
    ask(client, "evidence-eiffel", "What is the Eiffel Tower?")
    a_text, a_src, a = ask(client, "evidence-bm25", "tell me more about that")
    b_text, b_src, b = ask(client, "evidence-eiffel", "tell me more about that")
    assert topics(a_text, a_src) == {"bm25"}, (a["standalone_question"], a_src)
    assert topics(b_text, b_src) == {"eiffel"}, (b["standalone_question"], b_src)
    assert a["cache"]["kind"] == "miss" and b["cache"]["kind"] == "miss"  # neither got the other's answer
    assert a["standalone_question"] != b["standalone_question"] and a_text != b_text
    # a third conversation on the first topic shares the first one's cached follow-up answer
    ask(client, "evidence-bm25-again", "What is BM25?")
    c_text, _, c = ask(client, "evidence-bm25-again", "tell me more about that")
    assert c["cache"]["kind"] == "exact" and c_text == a_text
    # the server kept both turns, per tenant
    conv = httpx.get(f"{server}/v1/conversations/evidence-bm25", headers={"x-api-key": KEY}).json()
    assert conv["turns"] == 2 and conv["messages"][3]["sources"][0]["doc_id"].startswith("bm25")
    other = httpx.get(f"{server}/v1/conversations/evidence-bm25", headers={"x-api-key": "key-b"})
    assert other.status_code == 404 and other.json()["error"]["type"] == "invalid_request_error"


def test_stateless_history_follow_up(client: openai.OpenAI) -> None:
    first = "What is the Eiffel Tower?"
    out = client.chat.completions.create(
        model="ragline",
        messages=[
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": first},
            {"role": "assistant", "content": "A wrought-iron lattice tower in Paris [1]."},
            {"role": "user", "content": "how tall is it?"},
        ],
    )
    text = out.choices[0].message.content or ""
    assert "330" in text and topics(text, sources_of(out)) == {"eiffel"}
