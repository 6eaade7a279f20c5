"""OpenAILLM against the fake upstream over real HTTP: shapes, retries, faults, pooling."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
from pydantic import SecretStr

from ragline.config import LLMSettings
from ragline.errors import ConfigError, RateLimited, UpstreamError, UpstreamTimeout
from ragline.llm.base import LLM, Completion, GenParams, StreamChunk
from ragline.llm.openai import OpenAILLM
from ragline.testing import FakeUpstream
from ragline.types import Message

KEY = "sk-test-SECRET-0123456789abcdef"
MSGS: list[Message] = [
    {"role": "system", "content": "Answer with citations."},
    {"role": "user", "content": "Sources:\n\n[1]\nCats purr.\n\nQuestion: why do cats purr?"},
]
PARAMS = GenParams(model="fake-model", max_tokens=64)


def make_llm(url: str, **kw: Any) -> OpenAILLM:
    opts = {"backoff_initial_s": kw.pop("backoff_initial_s", 0.01), "transport": kw.pop("transport", None)}
    settings = LLMSettings(
        provider="openai",
        base_url=url,
        model="fake-model",
        api_key=SecretStr(KEY),
        **{"retries": 2, "timeout_s": 5.0, **kw},
    )
    return OpenAILLM(settings, **opts)


@pytest.fixture
async def llm(fake_upstream: FakeUpstream) -> AsyncIterator[OpenAILLM]:
    client = make_llm(fake_upstream.url)
    yield client
    await client.aclose()


async def collect(llm: OpenAILLM, params: GenParams = PARAMS) -> list[StreamChunk]:
    return [c async for c in llm.stream(MSGS, params)]


def assert_no_secret(exc: BaseException) -> None:
    for text in (str(exc), repr(exc), getattr(exc, "message", "")):
        assert KEY not in text
        assert "SECRET" not in text


# --------------------------------------------------------------------------- happy paths
async def test_protocol_and_id(llm: OpenAILLM, fake_upstream: FakeUpstream) -> None:
    assert isinstance(llm, LLM)
    assert llm.id == f"openai:fake-model@{fake_upstream.url}"
    assert KEY not in llm.id


async def test_id_strips_credentials_from_base_url() -> None:
    client = make_llm("http://user:pw@127.0.0.1:9/v1/?token=abc")
    try:
        assert client.id == "openai:fake-model@http://127.0.0.1:9/v1"
    finally:
        await client.aclose()


async def test_missing_base_url_is_config_error() -> None:
    with pytest.raises(ConfigError):
        OpenAILLM(LLMSettings(provider="openai", model="m"))


async def test_complete_returns_text_usage_and_sends_params(llm: OpenAILLM, fake_upstream: FakeUpstream) -> None:
    params = GenParams(model="fake-model", temperature=0.3, max_tokens=64, top_p=0.9, stop=("\n\n",), extra={"seed": 7})
    out = await llm.complete(MSGS, params)
    assert isinstance(out, Completion)
    assert "why do cats purr?" in out.text and "[1]" in out.text
    assert out.finish_reason == "stop"
    assert out.model == "fake-model"
    assert out.usage.completion_tokens == len(out.text.split(" "))
    assert out.usage.prompt_tokens > 0
    body = fake_upstream.last_request
    assert body is not None
    assert body["messages"] == MSGS
    assert (body["temperature"], body["max_tokens"], body["top_p"], body["stop"], body["seed"]) == (
        0.3,
        64,
        0.9,
        ["\n\n"],
        7,
    )
    assert "stream" not in body
    assert llm.calls == 1 and llm.requests == 1 and llm.retries == 0


async def test_complete_truncates_at_max_tokens(llm: OpenAILLM) -> None:
    out = await llm.complete(MSGS, GenParams(model="fake-model", max_tokens=3))
    assert out.finish_reason == "length"
    assert out.usage.completion_tokens == 3


async def test_stream_yields_deltas_then_usage(llm: OpenAILLM, fake_upstream: FakeUpstream) -> None:
    fake_upstream.configure(reply="Cats purr when content [1].")
    chunks = await collect(llm)
    *deltas, last = chunks
    assert [c.delta for c in deltas] == ["Cats", " purr", " when", " content", " [1]."]
    assert all(c.usage is None for c in deltas)
    assert last.delta == "" and last.finish_reason == "stop"
    assert last.usage is not None and last.usage.completion_tokens == 5
    body = fake_upstream.last_request
    assert body is not None and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


async def test_stream_timing_follows_latency_and_tps(llm: OpenAILLM, fake_upstream: FakeUpstream) -> None:
    fake_upstream.configure(reply="one two three four five six seven eight nine ten", latency_ms=200, tps=50)
    t0 = time.perf_counter()
    first_at: float | None = None
    async for c in llm.stream(MSGS, PARAMS):
        if c.delta and first_at is None:
            first_at = time.perf_counter() - t0
    total = time.perf_counter() - t0
    assert first_at is not None and first_at >= 0.2 - 0.02  # the first token waits for the latency
    assert total >= 0.2 + 10 / 50 - 0.03  # latency + n / tps
    # streamed, not buffered: the remaining 9 tokens arrive over ~9/50 s after the first one (a client that
    # buffered the whole reply would see its first delta only at the end); lower bounds only, so load on the
    # machine cannot make this fail
    assert total - first_at >= 0.5 * 9 / 50


async def test_complete_timing_follows_latency_and_tps(llm: OpenAILLM, fake_upstream: FakeUpstream) -> None:
    fake_upstream.configure(reply="a b c d e f g h i j", latency_ms=100, tps=100)
    t0 = time.perf_counter()
    await llm.complete(MSGS, PARAMS)
    assert time.perf_counter() - t0 >= 0.1 + 10 / 100 - 0.02


# --------------------------------------------------------------------------- retries
async def test_retry_on_429_honours_retry_after(llm: OpenAILLM, fake_upstream: FakeUpstream) -> None:
    fake_upstream.fail_next("429", 1, retry_after=1)
    t0 = time.perf_counter()
    out = await llm.complete(MSGS, PARAMS)
    elapsed = time.perf_counter() - t0
    assert out.text
    assert elapsed >= 1.0
    assert fake_upstream.route_calls("chat") == 2
    assert fake_upstream.outcome_calls("429") == 1 and fake_upstream.outcome_calls("ok") == 1
    assert llm.retries == 1 and llm.requests == 2 and llm.calls == 1


async def test_stream_retries_429_before_first_byte(llm: OpenAILLM, fake_upstream: FakeUpstream) -> None:
    fake_upstream.fail_next("429", 1, retry_after=1)
    t0 = time.perf_counter()
    chunks = await collect(llm)
    assert time.perf_counter() - t0 >= 1.0
    assert "".join(c.delta for c in chunks)
    assert fake_upstream.route_calls("chat") == 2 and llm.retries == 1


@pytest.mark.parametrize("status", ["500", "502", "503"])
async def test_retry_on_5xx(llm: OpenAILLM, fake_upstream: FakeUpstream, status: str) -> None:
    fake_upstream.fail_next(status, 2)
    out = await llm.complete(MSGS, PARAMS)
    assert out.text
    assert fake_upstream.route_calls("chat") == 3
    assert llm.retries == 2


async def test_stream_retry_on_5xx(llm: OpenAILLM, fake_upstream: FakeUpstream) -> None:
    fake_upstream.fail_next("503", 1)
    chunks = await collect(llm)
    assert chunks[-1].usage is not None
    assert fake_upstream.route_calls("chat") == 2


async def test_exhausted_429_raises_rate_limited(llm: OpenAILLM, fake_upstream: FakeUpstream) -> None:
    fake_upstream.fail_next("429", 3, retry_after=0)
    with pytest.raises(RateLimited) as info:
        await llm.complete(MSGS, PARAMS)
    assert info.value.retry_after == 0
    assert "429" in info.value.message
    assert fake_upstream.route_calls("chat") == 3  # 1 + settings.retries
    assert llm.failures == 1
    assert_no_secret(info.value)


async def test_retry_after_beyond_cap_is_not_waited(llm: OpenAILLM, fake_upstream: FakeUpstream) -> None:
    fake_upstream.fail_next("429", 1, retry_after=120)
    t0 = time.perf_counter()
    with pytest.raises(RateLimited) as info:
        await llm.complete(MSGS, PARAMS)
    assert time.perf_counter() - t0 < 60  # did not sleep the 120 s it was asked to (generous: no flake under load)
    assert info.value.retry_after == 120
    assert fake_upstream.route_calls("chat") == 1


async def test_exhausted_5xx_raises_upstream_error(llm: OpenAILLM, fake_upstream: FakeUpstream) -> None:
    fake_upstream.fail_next("500", 3)
    with pytest.raises(UpstreamError) as info:
        await llm.complete(MSGS, PARAMS)
    assert type(info.value) is UpstreamError
    assert "HTTP 500" in info.value.message and "fake 500" in info.value.message
    assert fake_upstream.route_calls("chat") == 3
    assert_no_secret(info.value)


async def test_stream_exhausted_5xx(llm: OpenAILLM, fake_upstream: FakeUpstream) -> None:
    fake_upstream.fail_next("502", 3)
    with pytest.raises(UpstreamError, match="HTTP 502"):
        await collect(llm)
    assert fake_upstream.route_calls("chat") == 3


async def test_4xx_is_not_retried(llm: OpenAILLM, fake_upstream: FakeUpstream) -> None:
    with pytest.raises(UpstreamError) as info:
        await llm.complete([], PARAMS)  # the fake answers 400 to empty messages
    assert "HTTP 400" in info.value.message and "messages" in info.value.message
    assert fake_upstream.route_calls("chat") == 0  # rejected before counting
    assert llm.requests == 1 and llm.retries == 0


async def test_connect_error_is_retried_then_upstream_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = make_llm(f"http://127.0.0.1:{port}/v1")
    try:
        with pytest.raises(UpstreamError) as info:
            await client.complete(MSGS, PARAMS)
        assert type(info.value) is UpstreamError
        assert "ConnectError" in info.value.message
        assert client.requests == 3 and client.retries == 2
        assert_no_secret(info.value)
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- timeouts, malformed
async def test_timeout_raises_upstream_timeout(fake_upstream: FakeUpstream) -> None:
    fake_upstream.fail_next("timeout")
    client = make_llm(fake_upstream.url, timeout_s=0.3)
    try:
        t0 = time.perf_counter()
        with pytest.raises(UpstreamTimeout) as info:
            await client.complete(MSGS, PARAMS)
        assert time.perf_counter() - t0 < 30  # gave up at its 0.3 s timeout, not after the fake's 300 s hang
        assert "ReadTimeout" in info.value.message
        assert fake_upstream.route_calls("chat") == 1  # timeouts are not retried
        assert_no_secret(info.value)
    finally:
        await client.aclose()


async def test_stream_timeout_raises_upstream_timeout(fake_upstream: FakeUpstream) -> None:
    fake_upstream.fail_next("timeout")
    client = make_llm(fake_upstream.url, timeout_s=0.3)
    try:
        with pytest.raises(UpstreamTimeout):
            await collect(client)
    finally:
        await client.aclose()


async def test_slow_first_token_times_out(fake_upstream: FakeUpstream) -> None:
    fake_upstream.configure(latency_ms=1500)
    client = make_llm(fake_upstream.url, timeout_s=0.3)
    try:
        with pytest.raises(UpstreamTimeout):
            await client.complete(MSGS, PARAMS)
    finally:
        await client.aclose()


async def test_malformed_responses_raise_upstream_error(llm: OpenAILLM, fake_upstream: FakeUpstream) -> None:
    fake_upstream.fail_next("malformed", 2)
    with pytest.raises(UpstreamError, match="malformed"):
        await llm.complete(MSGS, PARAMS)
    with pytest.raises(UpstreamError, match="malformed"):
        await collect(llm)
    assert fake_upstream.route_calls("chat") == 2  # malformed 200s are not retried


async def test_random_failures_are_absorbed_by_retries(llm: OpenAILLM, fake_upstream: FakeUpstream) -> None:
    fake_upstream.configure(failure_rate=0.3, failure_kind="503", seed=1)
    results = await asyncio.gather(*(llm.complete(MSGS, PARAMS) for _ in range(20)), return_exceptions=True)
    ok = [r for r in results if isinstance(r, Completion)]
    assert len(ok) >= 17
    assert all(isinstance(r, Completion | UpstreamError) for r in results)
    assert fake_upstream.outcome_calls("503") > 0
    # every 503 was retried, except the last one of each call that ran out of retries
    assert llm.retries == fake_upstream.outcome_calls("503") - (20 - len(ok))
    assert llm.requests == fake_upstream.route_calls("chat")


# --------------------------------------------------------------------------- pooling
async def test_sequential_calls_reuse_one_connection(llm: OpenAILLM, fake_upstream: FakeUpstream) -> None:
    for _ in range(5):
        await llm.complete(MSGS, PARAMS)
    async for _ in llm.stream(MSGS, PARAMS):
        pass
    assert fake_upstream.connections == 1


async def test_concurrent_requests_share_the_bounded_pool(fake_upstream: FakeUpstream) -> None:
    fake_upstream.configure(latency_ms=200)
    client = make_llm(fake_upstream.url, max_connections=4)
    try:
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(client.complete(MSGS, PARAMS) for _ in range(12)))
        elapsed = time.perf_counter() - t0
        assert len(outs) == 12 and all(o.text for o in outs)
        assert fake_upstream.connections == 4  # 12 calls, one pool of 4 connections
        assert elapsed >= 3 * 0.2 - 0.02  # three waves: the limit applies across calls
        # a second burst reuses the same pooled connections
        await asyncio.gather(*(client.complete(MSGS, PARAMS) for _ in range(8)))
        assert fake_upstream.connections == 4
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- secrets
async def test_api_key_sent_as_bearer_but_never_in_errors() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["authorization"])
        # a hostile upstream that echoes the key back in its error body
        return httpx.Response(401, json={"error": {"message": f"Incorrect API key provided: {KEY}"}})

    client = make_llm("http://upstream.test/v1", transport=httpx.MockTransport(handler))
    try:
        with pytest.raises(UpstreamError) as info:
            await client.complete(MSGS, PARAMS)
        assert seen == [f"Bearer {KEY}"]
        assert "HTTP 401" in info.value.message and "***" in info.value.message
        assert_no_secret(info.value)
        with pytest.raises(UpstreamError) as info2:
            await collect(client)
        assert_no_secret(info2.value)
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- SSE edge cases (mock transport)
def sse_client(
    events: list[bytes], status: int = 200, then: Callable[[], None] | None = None, calls: list[int] | None = None
) -> OpenAILLM:
    """An OpenAILLM whose transport streams the given raw SSE byte chunks, then calls ``then``."""

    class Stream(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for e in events:
                yield e
            if then is not None:
                then()

    def handler(request: httpx.Request) -> httpx.Response:
        if calls is not None:
            calls.append(1)
        return httpx.Response(status, headers={"content-type": "text/event-stream"}, stream=Stream())

    return make_llm("http://upstream.test/v1", transport=httpx.MockTransport(handler))


def chunk(content: str | None = None, finish: str | None = None, **extra: Any) -> bytes:
    delta = {} if content is None else {"content": content}
    ev = {
        "id": "x",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }
    return b"data: " + orjson.dumps(ev) + b"\n\n"


async def test_stream_without_usage_estimates_completion_tokens() -> None:
    client = sse_client([chunk("Hel"), chunk("lo"), chunk(" world"), chunk(None, "stop"), b"data: [DONE]\n\n"])
    try:
        chunks = await collect(client)
        assert "".join(c.delta for c in chunks) == "Hello world"
        last = chunks[-1]
        assert last.usage is not None and last.usage.completion_tokens == 3
        assert last.usage.prompt_tokens > 0 and last.finish_reason == "stop"
    finally:
        await client.aclose()


async def test_stream_parses_split_lines_comments_and_missing_final_newline() -> None:
    raw = chunk("a") + b": keep-alive comment\n\n" + chunk("b")[:20]
    rest = chunk("b")[20:] + chunk(None, "length") + b"data: [DONE]"
    client = sse_client([raw, rest])
    try:
        chunks = await collect(client)
        assert [c.delta for c in chunks] == ["a", "b", ""]
        assert chunks[-1].finish_reason == "length"
    finally:
        await client.aclose()


async def test_stream_truncated_without_done_is_an_error() -> None:
    client = sse_client([chunk("partial")])
    try:
        with pytest.raises(UpstreamError, match="ended before"):
            await collect(client)
    finally:
        await client.aclose()


async def test_stream_error_event_is_an_upstream_error() -> None:
    client = sse_client([chunk("x"), b'data: {"error": {"message": "model overloaded"}}\n\n'])
    try:
        with pytest.raises(UpstreamError, match="model overloaded"):
            await collect(client)
    finally:
        await client.aclose()


async def test_stream_failure_after_first_delta_is_not_retried() -> None:
    calls: list[int] = []

    def boom() -> None:
        raise httpx.RemoteProtocolError("peer closed connection mid-stream")

    client = sse_client([chunk("first")], then=boom, calls=calls)
    try:
        got: list[str] = []
        with pytest.raises(UpstreamError, match="RemoteProtocolError"):
            async for c in client.stream(MSGS, PARAMS):
                got.append(c.delta)
        assert got == ["first"]
        assert calls == [1] and client.retries == 0
    finally:
        await client.aclose()


async def test_stream_failure_before_first_delta_is_retried() -> None:
    calls: list[int] = []

    class Stream(httpx.AsyncByteStream):
        def __init__(self, attempt: int) -> None:
            self.attempt = attempt

        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield chunk("")  # the role chunk: no content yet
            if self.attempt == 1:
                raise httpx.RemoteProtocolError("peer closed connection")
            yield chunk("x") + chunk(None, "stop") + b"data: [DONE]\n\n"

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Stream(len(calls)))

    client = make_llm("http://upstream.test/v1", transport=httpx.MockTransport(handler))
    try:
        assert [c.delta for c in await collect(client)] == ["x", ""]
        assert len(calls) == 2 and client.retries == 1
    finally:
        await client.aclose()


async def test_server_rejecting_stream_options_is_retried_without_them() -> None:
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content)
        bodies.append(body)
        if "stream_options" in body:
            return httpx.Response(422, json={"detail": "extra field stream_options not permitted"})
        return httpx.Response(
            200,
            content=chunk("ok") + chunk(None, "stop") + b"data: [DONE]\n\n",
            headers={"content-type": "text/event-stream"},
        )

    client = make_llm("http://upstream.test/v1", transport=httpx.MockTransport(handler))
    try:
        assert "".join(c.delta for c in await collect(client)) == "ok"
        await collect(client)
        assert ["stream_options" in b for b in bodies] == [True, False, False]
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- standalone process
@pytest.fixture
def standalone_fake() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ragline.testing.fake_upstream",
            "--port",
            str(port),
            "--latency-ms",
            "10",
            "--tps",
            "1000",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "standalone fake upstream did not start"
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_standalone_fake_driven_over_http(standalone_fake: str) -> None:
    async with httpx.AsyncClient(base_url=standalone_fake) as http:
        r = await http.post("/_control", json={"reply": "Remote reply [1].", "fail_next": {"kind": "503", "count": 1}})
        assert r.status_code == 200 and r.json()["pending_faults"][0]["kind"] == "503"
        async with make_llm(standalone_fake + "/v1") as client:
            out = await client.complete(MSGS, PARAMS)
        assert out.text == "Remote reply [1]."
        stats = (await http.get("/_stats")).json()
        assert stats["routes"]["chat"] == 2 and stats["outcomes"]["503"] == 1
        assert (await http.post("/_reset")).status_code == 200
        stats = (await http.get("/_stats")).json()
        assert stats["total"] == 0 and stats["config"]["reply"] is None
        bad = await http.post("/_control", json={"latnecy_ms": 5})
        assert bad.status_code == 400 and "latnecy_ms" in bad.text
