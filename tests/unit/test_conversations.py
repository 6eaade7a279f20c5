"""Conversations end to end in-process (HashEmbedder, no model): conversation_id on /v1/query, follow-ups
condensed per conversation, answers cached by standalone question, GET/DELETE per tenant, limits,
the 30-turn token budget, and the OpenAI-compatible routes' shapes and errors."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient

from ragline import condense as cd
from ragline.config import Settings
from ragline.pipeline import AsyncRAG
from ragline.server.app import create_app
from ragline.testing import HashEmbedder, ScriptedLLM
from ragline.types import Message

DOCS = {
    "documents": [
        {"id": "bm25", "title": "BM25", "text": "BM25 is a ranking function used by search engines to score "
         "documents. BM25 weighs term frequency against document length with parameters k1 and b."},
        {"id": "bm25-history", "title": "Okapi BM25", "text": "The Okapi BM25 ranking function was developed at "
         "City University London in the 1980s and 1990s for the Okapi retrieval system."},
        {"id": "eiffel", "title": "Eiffel Tower", "text": "The Eiffel Tower is a wrought-iron lattice tower in "
         "Paris. The Eiffel Tower opened in 1889 for the World's Fair."},
        {"id": "eiffel-design", "title": "Eiffel Tower design", "text": "Gustave Eiffel's company designed and "
         "built the Eiffel Tower; it was the tallest structure in the world until 1930."},
        {"id": "tea", "title": "Green tea", "text": "Green tea contains caffeine and antioxidants called catechins."},
    ]
}  # fmt: skip
KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}
A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}


def make_client(tmp_path: Path, llm: Any = None, **conversation: Any) -> TestClient:
    settings = Settings(
        data_dir=tmp_path / "data",
        cache={"enabled": True, "redis_url": None},
        server={"api_keys": KEYS},
        conversation=conversation,
    )
    app = create_app(settings, AsyncRAG(settings, embedder=HashEmbedder(), llm=llm))
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with make_client(tmp_path) as c:
        for h in (A, B):
            assert c.post("/v1/documents", json=DOCS, headers=h).status_code == 200
        yield c


def ask(c: TestClient, cid: str, q: str, h: dict[str, str] = A) -> dict[str, Any]:
    r = c.post("/v1/query", json={"query": q, "conversation_id": cid}, headers=h)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def topics(answer: dict[str, Any]) -> set[str]:
    """The topics of the two best-scored sources and of every source the answer cites."""
    cited = {int(n) for n in re.findall(r"\[(\d+)\]", answer["answer"])}
    srcs = list(enumerate(answer["sources"], start=1))
    best = {i for i, _ in sorted(srcs, key=lambda x: -x[1]["score"])[:2]}  # RRF order (the context is MMR's)
    return {s["doc_id"].split("-")[0] for i, s in srcs if i in best | cited}


def test_followups_get_their_own_conversations_context(client: TestClient) -> None:
    a1 = ask(client, "conv-a", "What is the BM25 ranking function?")
    b1 = ask(client, "conv-b", "When did the Eiffel Tower open?")
    assert a1["sources"][0]["doc_id"].startswith("bm25") and b1["sources"][0]["doc_id"].startswith("eiffel")
    a2 = ask(client, "conv-a", "tell me more about that")
    b2 = ask(client, "conv-b", "tell me more about that")
    assert a2["conversation"]["standalone_question"] != b2["conversation"]["standalone_question"]
    assert "BM25" in a2["conversation"]["standalone_question"]
    assert "Eiffel" in b2["conversation"]["standalone_question"]
    assert topics(a2) == {"bm25"} and topics(b2) == {"eiffel"}  # each its own topic, nothing of the other's
    assert a2["cache"]["kind"] == "miss" and b2["cache"]["kind"] == "miss"  # neither served the other's answer
    assert a2["answer"] != b2["answer"]
    # the same standalone question in a third conversation shares the cached answer
    ask(client, "conv-c", "What is the BM25 ranking function?")
    c2 = ask(client, "conv-c", "tell me more about that")
    assert c2["conversation"]["standalone_question"] == a2["conversation"]["standalone_question"]
    assert c2["cache"]["kind"] == "exact" and c2["answer"] == a2["answer"]
    # and a conversation's first question is the plain query's cache entry too
    plain = client.post("/v1/query", json={"query": "When did the Eiffel Tower open?"}, headers=A).json()
    assert plain["cache"]["kind"] == "exact" and plain["answer"] == b1["answer"]


def test_get_and_delete_are_tenant_scoped(client: TestClient) -> None:
    ask(client, "shared-id", "What is the BM25 ranking function?")
    ask(client, "shared-id", "tell me more about that")
    r = client.get("/v1/conversations/shared-id", headers=A)
    assert r.status_code == 200
    conv = r.json()
    assert conv["turns"] == 2 and [m["role"] for m in conv["messages"]] == ["user", "assistant"] * 2
    assert "BM25" in conv["messages"][2]["standalone_question"]
    assert conv["messages"][1]["sources"][0]["doc_id"].startswith("bm25")
    assert client.get("/v1/conversations/shared-id", headers=B).status_code == 404  # another tenant's id
    assert client.delete("/v1/conversations/shared-id", headers=B).status_code == 404
    # tenant b's conversation of the same id is its own
    b1 = ask(client, "shared-id", "When did the Eiffel Tower open?", B)
    assert b1["conversation"]["turn"] == 1
    assert client.delete("/v1/conversations/shared-id", headers=A).json() == {"deleted": "shared-id"}
    assert client.get("/v1/conversations/shared-id", headers=A).status_code == 404
    assert client.get("/v1/conversations/shared-id", headers=B).json()["turns"] == 1


def test_conversation_stream(client: TestClient) -> None:
    ask(client, "s", "When did the Eiffel Tower open?")
    r = client.post("/v1/query", json={"query": "who built it?", "conversation_id": "s", "stream": True}, headers=A)
    assert r.status_code == 200
    names = [block.split("\n")[0] for block in r.text.strip().split("\n\n")]
    assert names[0] == "event: conversation" and names[1] == "event: sources" and names[-1] == "event: done"
    conv = client.get("/v1/conversations/s", headers=A).json()
    assert conv["turns"] == 2 and "Eiffel" in conv["messages"][2]["standalone_question"]
    assert conv["messages"][3]["content"]  # the streamed answer was recorded


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"query": "q", "conversation_id": "bad id!"}, 400, "conversation_id must be"),
        ({"query": "q", "conversation_id": 7}, 400, "conversation_id must be"),
        ({"query": "q", "conversation_id": "x" * 129}, 400, "1-128 characters"),
        ({"query": "q", "conversation_id": "c", "history": [{"role": "user", "content": "hi"}]}, 400, "not both"),
        ({"query": "q", "conversation": "c"}, 400, "unknown field(s) ['conversation']"),
        ({"query": "", "conversation_id": "c"}, 400, "query is empty"),
        ({"query": "x" * 2001, "conversation_id": "c"}, 413, "2001 characters"),
    ],
)
def test_bad_conversation_requests(client: TestClient, body: dict[str, Any], status: int, needle: str) -> None:
    r = client.post("/v1/query", json=body, headers=A)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error"


def test_turn_and_conversation_limits(tmp_path: Path) -> None:
    with make_client(tmp_path, max_turns=2, max_conversations_per_tenant=2) as c:
        c.post("/v1/documents", json=DOCS, headers=A)
        ask(c, "one", "What is BM25?")
        ask(c, "one", "tell me more")
        r = c.post("/v1/query", json={"query": "and more?", "conversation_id": "one"}, headers=A)
        assert r.status_code == 413 and "conversation.max_turns" in r.json()["error"]["message"]
        ask(c, "two", "What is BM25?")
        r = c.post("/v1/query", json={"query": "What is BM25?", "conversation_id": "three"}, headers=A)
        assert r.status_code == 413 and "max_conversations_per_tenant" in r.json()["error"]["message"]
        ask(c, "three", "What is BM25?", B)  # another tenant's count


def scripted(messages: list[Message]) -> str:
    """Standalone questions, summaries and answers, told apart by the prompt."""
    system = messages[0]["content"]
    if system == cd.CONDENSE_SYSTEM:
        q = messages[-1]["content"].rpartition("Follow-up question: ")[2]
        return f"Standalone question: {q} regarding the Eiffel Tower"
    if system.startswith("Summarise"):
        return "The user asked many questions about the Eiffel Tower. " * 40  # over budget: clipped
    return "The Eiffel Tower opened in 1889 [1]. " * 20


@pytest.mark.parametrize("condense", ["llm", "rules"])
def test_thirty_turns_stay_within_the_token_budget(tmp_path: Path, condense: str) -> None:
    llm = ScriptedLLM(scripted)
    budget = 300
    with make_client(tmp_path, llm, condense=condense, history_token_budget=budget, summary_token_budget=80,
                     history_in_prompt=True) as c:  # fmt: skip
        c.post("/v1/documents", json=DOCS, headers=A)
        count = c.app.state.rag.chunker.count_tokens  # type: ignore[attr-defined]
        for i in range(30):
            q = "When did the Eiffel Tower open?" if i == 0 else f"and what about detail number {i} of it?"
            out = ask(c, "long", q)
            assert out["conversation"]["turn"] == i + 1
        conv = c.get("/v1/conversations/long", headers=A).json()
    assert conv["turns"] == 30 and conv["summary"] and conv["summarized_messages"] > 40
    assert count(conv["summary"]) <= 80
    answers = [p for p in llm.prompts if p[0]["content"].startswith("You answer")]
    assert len(answers) >= 29  # identical prompts may be LLM-cache hits
    for prompt in answers:  # what the answer prompt carries besides the sources and the question
        history = prompt[1:-1]
        assert sum(cd.message_cost(m, count) for m in history) <= budget
    total = [sum(count(m["content"]) + 4 for m in p) for p in answers]
    assert max(total) <= budget + 1500 + 200  # history + context.token_budget + instructions and question
    condensed = [p for p in llm.prompts if p[0]["content"] == cd.CONDENSE_SYSTEM]
    assert (len(condensed) >= 29) == (condense == "llm")
    for p in condensed:
        assert count(p[1]["content"]) <= budget + 60  # the history, the labels and a short follow-up
    summaries = [p for p in llm.prompts if p[0]["content"].startswith("Summarise")]
    assert (len(summaries) > 0) == (condense == "llm")
    for p in summaries:
        assert count(p[1]["content"]) <= budget + 120  # the folded turns, within the history they came from


# -- the OpenAI-compatible routes (shapes; the official client is in tests/integration) -------------------
def chat(c: TestClient, body: dict[str, Any], h: dict[str, str] = A) -> Any:
    return c.post("/v1/chat/completions", json={"model": "ragline", **body}, headers=h)


def test_chat_completion_shape_and_cache_header(client: TestClient) -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "When did the Eiffel Tower open?"}]
    r = chat(client, {"messages": msgs})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["object"] == "chat.completion" and d["choices"][0]["message"]["role"] == "assistant"
    text = d["choices"][0]["message"]["content"]
    assert "1889" in text and "[1]" in text and "\n\nSources:\n[1] " in text
    assert d["sources"][0]["index"] == 1 and d["sources"][0]["doc_id"].startswith("eiffel")
    assert d["usage"]["total_tokens"] > 0
    assert r.headers["x-ragline-cache"] == "miss" and d["ragline"]["cache"]["kind"] == "miss"
    again = chat(client, {"messages": msgs})
    assert again.headers["x-ragline-cache"] == "exact; tier=l1" and again.json()["ragline"]["cache"]["kind"] == "exact"
    assert again.json()["choices"][0]["message"]["content"] == text
    # a stateless history: the follow-up is condensed from the messages
    msgs2 = [*msgs, {"role": "assistant", "content": text}, {"role": "user", "content": "tell me more about that"}]
    d2 = chat(client, {"messages": msgs2}).json()
    assert "Eiffel" in d2["ragline"]["standalone_question"] and d2["sources"][0]["doc_id"].startswith("eiffel")


def test_chat_stream_chunks(client: TestClient) -> None:
    r = chat(client, {"messages": [{"role": "user", "content": "What is BM25?"}], "stream": True,
                      "stream_options": {"include_usage": True}})  # fmt: skip
    assert r.status_code == 200
    lines = [ln.removeprefix("data: ") for ln in r.text.strip().split("\n\n")]
    assert lines[-1] == "[DONE]"
    chunks = [orjson.loads(x) for x in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    final = chunks[-2]
    assert final["choices"][0]["finish_reason"] == "stop" and final["sources"][0]["doc_id"].startswith("bm25")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert "BM25" in text and "Sources:" in text


def test_chat_with_conversation_id(client: TestClient) -> None:
    d1 = chat(client, {"messages": [{"role": "user", "content": "When did the Eiffel Tower open?"}],
                       "conversation_id": "oa"}).json()  # fmt: skip
    assert d1["ragline"]["conversation_id"] == "oa"
    d2 = chat(client, {"messages": [{"role": "user", "content": "who built it?"}], "conversation_id": "oa"}).json()
    assert "Eiffel" in d2["ragline"]["standalone_question"] and d2["ragline"]["turn"] == 2
    assert client.get("/v1/conversations/oa", headers=A).json()["turns"] == 2


def test_models(client: TestClient) -> None:
    d = client.get("/v1/models", headers=A).json()
    assert d["object"] == "list" and "ragline" in [m["id"] for m in d["data"]]
    assert client.get("/v1/models", headers={"Authorization": "Bearer nope"}).json()["error"]["type"] == (
        "authentication_error"
    )


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0]"),
        ({"messages": [{"role": "user", "content": "q"}], "n": 2}, 400, "n"),
        ({"messages": [{"role": "user", "content": "q"}], "bogus": 1}, 400, "bogus"),
        ({"messages": [{"role": "user", "content": "q"}], "model": "gpt-nothing"}, 404, "model"),
        ({"messages": [{"role": "user", "content": "q"}], "model": None}, 400, "model"),
        ({"messages": [{"role": "user", "content": "x" * 2001}]}, 413, None),
    ],
)
def test_chat_errors_are_openai_shaped(client: TestClient, body: dict[str, Any], status: int, param: str) -> None:
    r = client.post("/v1/chat/completions", json={"model": "ragline", **body}, headers=A)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_fixture_settings_unchanged(make_settings: Callable[..., Settings] | None = None) -> None:
    assert Settings().conversation.history_in_prompt is False  # answers shared by standalone question


async def test_python_api(tmp_path: Path) -> None:
    from ragline.conversation import Conversations
    from ragline.types import Document

    settings = Settings(data_dir=tmp_path / "data", cache={"enabled": True, "redis_url": None})
    async with AsyncRAG(settings, embedder=HashEmbedder()) as rag:
        await rag.ingest([Document(d["id"], d["text"], d["title"]) for d in DOCS["documents"]])
        convs = Conversations(rag)
        first = await convs.ask("When did the Eiffel Tower open?", conversation_id="py")
        assert first["conversation"] == {
            "id": "py",
            "turn": 1,
            "standalone_question": "When did the Eiffel Tower open?",
        }
        again = await convs.ask("who built it?", conversation_id="py")
        assert "Eiffel" in again["conversation"]["standalone_question"] and again["sources"]
        stateless = await convs.ask("who built it?", history=[{"role": "user", "content": "What is the Eiffel Tower?"}])
        assert "Eiffel" in stateless["conversation"]["standalone_question"] and "id" not in stateless["conversation"]
        assert (await convs.get("default", "py"))["turns"] == 2
