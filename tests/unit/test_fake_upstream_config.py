"""Pure logic of the fake upstream and of the OpenAI client (no sockets, no threads).

The fake is driven in-process through ``httpx.ASGITransport`` against its ASGI
app; ``parse_retry_after`` is tested for both header forms.
"""

from __future__ import annotations

import base64
import email.utils
import time
from collections.abc import AsyncIterator

import httpx
import numpy as np
import orjson
import pytest

from ragline.llm.openai import parse_retry_after
from ragline.testing import FakeUpstream, UpstreamConfig
from ragline.testing.fake_upstream import default_reply, embed_text, tokenize

# --------------------------------------------------------------------------- parse_retry_after


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2", 2.0),
        (" 30 ", 30.0),
        ("1.5", 1.5),
        ("0", 0.0),
        ("-3", 0.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("nan", None),
        ("inf", None),
    ],
)
def test_parse_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    header = email.utils.formatdate(now + 42, usegmt=True)  # "Tue, 14 Nov 2023 22:14:02 GMT"
    assert parse_retry_after(header, now=now) == pytest.approx(42.0)
    past = email.utils.formatdate(now - 100, usegmt=True)
    assert parse_retry_after(past, now=now) == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=time.time()) == 0.0
    assert parse_retry_after("Wed, 99 Foo 2015 07:28:00 GMT") is None


# --------------------------------------------------------------------------- pure helpers


def test_tokenize_keeps_spaces_so_deltas_concatenate() -> None:
    text = "Cats purr  when content [1]."
    toks = tokenize(text)
    assert "".join(toks) == text
    assert toks[:2] == ["Cats", " purr"]
    assert tokenize("") == []


def test_default_reply_quotes_the_question_and_cites() -> None:
    msgs = [
        {"role": "system", "content": "x"},
        {"role": "user", "content": "Sources:\n\n[1]\nCats purr.\n\nQuestion: why do cats purr?"},
    ]
    reply = default_reply(msgs)
    assert "why do cats purr?" in reply and "[1]" in reply and "Sources" not in reply
    assert default_reply(msgs) == reply
    assert "hello there" in default_reply([{"role": "user", "content": "hello there"}])
    assert default_reply([{"role": "system", "content": "only system"}])


def test_embed_text_is_deterministic_unit_and_distinct() -> None:
    a, b = embed_text("hello", 64), embed_text("hello", 64)
    assert a.dtype == np.float32 and a.shape == (64,)
    assert np.array_equal(a, b)
    assert float(np.linalg.norm(a)) == pytest.approx(1.0, abs=1e-5)
    assert abs(float(a @ embed_text("world", 64))) < 0.6


def test_config_update_validates() -> None:
    cfg = UpstreamConfig()
    assert cfg.update({"latency_ms": 5}).latency_ms == 5 and cfg.latency_ms == 0
    for bad in ({"nope": 1}, {"failure_kind": "418"}, {"failure_rate": 2}, {"embedding_dim": 0}, {"tps": -1}):
        with pytest.raises(ValueError):
            cfg.update(bad)
    fake = FakeUpstream(tps=10)
    with pytest.raises(ValueError):
        fake.fail_next("teapot")
    with pytest.raises(ValueError):
        fake.fail_next("500", route="completions")
    with pytest.raises(RuntimeError, match="not running"):
        _ = fake.url


# --------------------------------------------------------------------------- the ASGI app in-process


@pytest.fixture
async def asgi() -> AsyncIterator[tuple[FakeUpstream, httpx.AsyncClient]]:
    fake = FakeUpstream(embedding_dim=8)
    transport = httpx.ASGITransport(app=fake.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fake") as client:
        yield fake, client


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def test_chat_non_stream_shape(asgi: tuple[FakeUpstream, httpx.AsyncClient]) -> None:
    fake, client = asgi
    fake.configure(reply="one two three")
    r = await client.post("/v1/chat/completions", json=CHAT)
    data = r.json()
    assert r.status_code == 200 and data["object"] == "chat.completion"
    assert data["choices"][0]["message"] == {"role": "assistant", "content": "one two three"}
    assert data["usage"] == {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}
    assert fake.calls == 1 and fake.route_calls("chat") == 1 and fake.last_request == CHAT


async def test_chat_stream_usage_placement(asgi: tuple[FakeUpstream, httpx.AsyncClient]) -> None:
    fake, client = asgi
    fake.configure(reply="a b")

    async def events(body: dict[str, object]) -> list[dict[str, object] | str]:
        r = await client.post("/v1/chat/completions", json=body)
        assert r.headers["content-type"] == "text/event-stream"
        out: list[dict[str, object] | str] = []
        for block in r.text.split("\n\n"):
            if block:
                payload = block.removeprefix("data: ")
                out.append(payload if payload == "[DONE]" else orjson.loads(payload))
        return out

    plain = await events({**CHAT, "stream": True})
    assert plain[-1] == "[DONE]"
    finish = plain[-2]
    assert isinstance(finish, dict) and finish["usage"] == {
        "prompt_tokens": 1,
        "completion_tokens": 2,
        "total_tokens": 3,
    }
    with_usage = await events({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    usage_chunk = with_usage[-2]
    assert isinstance(usage_chunk, dict) and usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


async def test_queued_faults_and_route_filter(asgi: tuple[FakeUpstream, httpx.AsyncClient]) -> None:
    fake, client = asgi
    fake.fail_next(429, 1, retry_after=2, route="embeddings")
    fake.fail_next("503", 1, retry_after=0.5)
    r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503 and r.headers["retry-after"] == "0.5"
    assert r.json()["error"]["type"] == "server_error"
    assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
    r = await client.post("/v1/embeddings", json={"input": "x"})
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    assert fake.outcome_calls("429") == 1 and fake.outcome_calls("503") == 1
    assert fake.outcome_calls("ok") == 1


async def test_failure_rate_is_seeded(asgi: tuple[FakeUpstream, httpx.AsyncClient]) -> None:
    fake, client = asgi

    async def run() -> list[int]:
        fake.reset()
        fake.configure(failure_rate=0.5, failure_kind="429", seed=3)
        return [(await client.post("/v1/chat/completions", json=CHAT)).status_code for _ in range(20)]

    first = await run()
    assert first == await run()
    assert set(first) == {200, 429}


async def test_embeddings_float_and_base64(asgi: tuple[FakeUpstream, httpx.AsyncClient]) -> None:
    _, client = asgi
    r = await client.post("/v1/embeddings", json={"input": ["a", "b"], "model": "e"})
    data = r.json()
    assert [d["index"] for d in data["data"]] == [0, 1] and data["model"] == "e"
    vec = np.array(data["data"][0]["embedding"], dtype=np.float32)
    assert vec.shape == (8,) and np.allclose(vec, embed_text("a", 8))
    r = await client.post("/v1/embeddings", json={"input": "a", "encoding_format": "base64", "dimensions": 4})
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    assert np.allclose(np.frombuffer(raw, dtype="<f4"), embed_text("a", 4))


async def test_models_control_stats_reset_and_errors(asgi: tuple[FakeUpstream, httpx.AsyncClient]) -> None:
    _, client = asgi
    assert (await client.get("/v1/models")).json()["data"][0]["id"] == "fake-model"
    r = await client.post(
        "/_control", json={"latency_ms": 1, "model": "other", "fail_next": [{"kind": "timeout", "count": 2}]}
    )
    assert r.status_code == 200
    stats = r.json()
    assert stats["config"]["model"] == "other" and len(stats["pending_faults"]) == 2
    assert (await client.post("/_control", json={"fail_next": {"kind": "teapot"}})).status_code == 400
    assert (await client.post("/_reset")).json() == {"ok": True}
    stats = (await client.get("/_stats")).json()
    assert stats["config"]["model"] == "fake-model" and stats["pending_faults"] == [] and stats["total"] == 0
    assert (await client.post("/v1/chat/completions", content=b"{nope")).status_code == 400
    assert (await client.post("/v1/chat/completions", json={"messages": []})).status_code == 400
    assert (await client.get("/v1/nothing")).status_code == 404
