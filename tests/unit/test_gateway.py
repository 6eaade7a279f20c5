"""The gateway over fake upstreams: failover, Retry-After, breakers, fallbacks, capacity, streams."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from ragline.config import GatewaySettings, LLMSettings, UpstreamSettings
from ragline.errors import ConfigError, RateLimited, ServiceUnavailable, UpstreamError
from ragline.llm.base import FALLBACK_FINISH, GenParams
from ragline.llm.gateway import GatewayLLM
from ragline.testing import FakeUpstream
from ragline.types import Message

MSGS: list[Message] = [{"role": "user", "content": "What colour is the sky?"}]
P = GenParams(model="chat", max_tokens=8)


@pytest.fixture(scope="module")
def _servers() -> Iterator[list[FakeUpstream]]:
    with ExitStack() as stack:
        yield [stack.enter_context(FakeUpstream(model=f"f{i}")) for i in range(3)]


@pytest.fixture
def fakes(_servers: list[FakeUpstream]) -> list[FakeUpstream]:
    for f in _servers:
        f.reset()
    return _servers


def gateway(fakes: list[FakeUpstream], n: int | None = None, *, groups: list[str] | None = None,
            upstream: dict[str, Any] | None = None, **kw: Any) -> GatewayLLM:  # fmt: skip
    used = fakes[: n or len(fakes)]
    ups = tuple(
        UpstreamSettings(
            base_url=f.url, model="chat", group=(groups[i] if groups else None), name=f"u{i}",
            **{"timeout_s": 1.0, **(upstream or {})},
        )
        for i, f in enumerate(used)
    )  # fmt: skip
    extractive = kw.pop("extractive_fallback", False)
    gw = GatewaySettings(upstreams=ups, **{"strategy": "round_robin", **kw})
    return GatewayLLM(LLMSettings(provider="gateway", model="chat", gateway=gw, extractive_fallback=extractive))


async def test_answers_say_which_upstream(fakes: list[FakeUpstream]) -> None:
    llm = gateway(fakes)
    seen = {(await llm.complete(MSGS, P)).upstream for _ in range(3)}
    assert seen == {"u0", "u1", "u2"}
    assert [f.calls for f in fakes] == [1, 1, 1]
    assert fakes[0].last_request is not None and fakes[0].last_request["model"] == "chat"
    await llm.aclose()


async def test_a_failing_upstream_is_retried_elsewhere_and_its_breaker_opens(fakes: list[FakeUpstream]) -> None:
    fakes[0].configure(failure_rate=1.0, failure_kind="500")
    llm = gateway(fakes, 2, breaker_failures=2, breaker_cooldown_s=30)
    for _ in range(6):
        assert (await llm.complete(MSGS, P)).upstream == "u1"
    assert fakes[0].calls == 2  # two failures opened its breaker: no further calls
    snap = await llm.upstreams()
    assert snap["upstreams"][0]["breaker"] == "open"
    assert [e["event"] for e in snap["events"]] == ["opened"]
    assert llm.gateway.retries == 2
    await llm.aclose()


async def test_the_half_open_probe_closes_the_breaker_on_success(fakes: list[FakeUpstream]) -> None:
    fakes[0].configure(failure_rate=1.0, failure_kind="503")
    llm = gateway(fakes, 2, breaker_failures=1, breaker_cooldown_s=0.3)
    await llm.complete(MSGS, P)
    assert (await llm.upstreams())["upstreams"][0]["breaker"] == "open"
    fakes[0].configure(failure_rate=0.0)
    await asyncio.sleep(0.35)
    answered = {(await llm.complete(MSGS, P)).upstream for _ in range(4)}
    assert "u0" in answered
    snap = await llm.upstreams()
    assert snap["upstreams"][0]["breaker"] == "closed"
    assert [e["event"] for e in snap["events"]] == ["opened", "closed"]
    await llm.aclose()


async def test_retry_after_is_honoured_per_upstream(fakes: list[FakeUpstream]) -> None:
    fakes[0].fail_next("429", 1, retry_after=0.5)
    llm = gateway(fakes, 2)
    for _ in range(6):  # round robin would send half of these to u0: its Retry-After keeps them away
        assert (await llm.complete(MSGS, P)).text
    assert fakes[0].calls == 1 and fakes[0].early_arrivals == 0
    await asyncio.sleep(0.55)
    assert {(await llm.complete(MSGS, P)).upstream for _ in range(2)} == {"u0", "u1"}
    assert fakes[0].early_arrivals == 0
    await llm.aclose()


async def test_a_bad_request_is_not_retried_nor_counted_against_the_upstream(fakes: list[FakeUpstream]) -> None:
    llm = gateway(fakes)
    with pytest.raises(UpstreamError) as err:
        await llm.complete([], P)  # the fake answers 400: the same request would fail everywhere
    assert err.value.upstream_status == 400
    snap = await llm.upstreams()
    assert sum(r["requests"] for r in snap["upstreams"]) == 1 and llm.gateway.retries == 0
    assert all(r["errors"] == 0 and r["breaker"] == "closed" for r in snap["upstreams"])
    await llm.aclose()


async def test_timeouts_fail_over(fakes: list[FakeUpstream]) -> None:
    fakes[0].configure(failure_rate=1.0, failure_kind="timeout", hang_s=5)
    llm = gateway(fakes, 2, upstream={"timeout_s": 0.2})
    assert (await llm.complete(MSGS, P)).upstream == "u1"
    assert (await llm.complete(MSGS, P)).upstream == "u1"
    await llm.aclose()


async def test_fallback_groups_in_order_then_the_error(fakes: list[FakeUpstream]) -> None:
    fakes[0].configure(failure_rate=1.0, failure_kind="500")
    llm = gateway(fakes, 3, groups=["chat", "backup", "last"], fallbacks=("backup", "last"), retries=1)
    assert (await llm.complete(MSGS, P)).upstream == "u1"
    fakes[1].configure(failure_rate=1.0, failure_kind="502")
    assert (await llm.complete(MSGS, P)).upstream == "u2"
    fakes[2].configure(failure_rate=1.0, failure_kind="500")
    with pytest.raises(UpstreamError, match="HTTP 500"):
        await llm.complete(MSGS, P)
    snap = await llm.upstreams()
    assert {(e["upstream"], e["to"]) for e in snap["events"] if e["event"] == "fallback"} == {
        ("chat", "backup"),
        ("backup", "last"),
    }
    await llm.aclose()


async def test_the_extractive_answerer_is_the_last_resort(fakes: list[FakeUpstream]) -> None:
    fakes[0].configure(failure_rate=1.0, failure_kind="500")
    llm = gateway(fakes, 1, extractive_fallback=True, retries=0)
    ctx: list[Message] = [
        {"role": "system", "content": "Answer from the sources."},
        {
            "role": "user",
            "content": "Sources:\n[1] The sky is blue on clear days.\n\nQuestion: What colour is the sky?",
        },
    ]
    out = await llm.complete(ctx, P)
    assert out.upstream == "extractive" and out.finish_reason == FALLBACK_FINISH
    chunks = [c async for c in llm.stream(ctx, P)]
    assert chunks[-1].finish_reason == FALLBACK_FINISH and chunks[-1].upstream == "extractive"
    await llm.aclose()


async def test_no_capacity_in_time_is_429_with_retry_after(fakes: list[FakeUpstream]) -> None:
    llm = gateway(fakes, 1, upstream={"rpm": 6}, queue_timeout_s=0.2)
    await llm.complete(MSGS, P)
    with pytest.raises(RateLimited) as err:
        await llm.complete(MSGS, P)
    assert err.value.status == 429 and err.value.retry_after is not None and 10 < err.value.retry_after <= 11.2
    assert fakes[0].calls == 1
    await llm.aclose()


async def test_waits_for_capacity_within_the_deadline(fakes: list[FakeUpstream]) -> None:
    llm = gateway(fakes, 1, upstream={"rpm": 600}, headroom=1.0)
    t0 = asyncio.get_running_loop().time()
    await asyncio.gather(*(llm.complete(MSGS, P) for _ in range(4)))
    assert asyncio.get_running_loop().time() - t0 >= 0.29  # 10/s: the 4th is admitted ≥ 0.3 s after the 1st
    await llm.aclose()


async def test_every_breaker_open_is_503_with_retry_after(fakes: list[FakeUpstream]) -> None:
    for f in fakes[:2]:
        f.configure(failure_rate=1.0, failure_kind="500")
    llm = gateway(fakes, 2, breaker_failures=1, breaker_cooldown_s=20, retries=1)
    with pytest.raises(UpstreamError):
        await llm.complete(MSGS, P)
    with pytest.raises(ServiceUnavailable) as err:
        await llm.complete(MSGS, P)
    assert err.value.status == 503 and err.value.retry_after is not None and err.value.retry_after > 15
    await llm.aclose()


async def test_max_in_flight_queues_calls(fakes: list[FakeUpstream]) -> None:
    fakes[0].configure(latency_ms=50)
    llm = gateway(fakes, 1, upstream={"max_in_flight": 2})
    peak = 0

    async def watch() -> None:
        nonlocal peak
        for _ in range(40):
            peak = max(peak, llm.gateway.upstreams[0].inflight)
            await asyncio.sleep(0.005)

    await asyncio.gather(watch(), *(llm.complete(MSGS, P) for _ in range(6)))
    assert peak == 2 and fakes[0].calls == 6
    await llm.aclose()


async def test_a_stream_fails_over_before_its_first_token(fakes: list[FakeUpstream]) -> None:
    fakes[0].fail_next("500", 1)
    llm = gateway(fakes, 2)
    chunks = [c async for c in llm.stream(MSGS, P)]
    assert "".join(c.delta for c in chunks) and chunks[-1].upstream == "u1"
    assert llm.gateway.upstreams[1].inflight == 0  # the stream's slot was released at its end
    await llm.aclose()


async def test_streams_hold_their_slot_until_they_end(fakes: list[FakeUpstream]) -> None:
    fakes[0].configure(tps=100)
    llm = gateway(fakes, 1, upstream={"max_in_flight": 1})
    agen = llm.stream(MSGS, P)
    await anext(agen)
    assert llm.gateway.upstreams[0].inflight == 1
    rest = [c async for c in agen]
    assert rest[-1].finish_reason is not None
    assert llm.gateway.upstreams[0].inflight == 0
    await llm.aclose()


def test_configuration_errors_are_clear(fakes: list[FakeUpstream]) -> None:
    with pytest.raises(ConfigError, match="upstreams is empty"):
        GatewayLLM(LLMSettings(provider="gateway", model="chat"))
    with pytest.raises(ConfigError, match="no upstream serves model group 'other'"):
        GatewayLLM(
            LLMSettings(
                provider="gateway",
                model="other",
                gateway=GatewaySettings(upstreams=(UpstreamSettings(base_url=fakes[0].url, model="chat"),)),
            )
        )
    with pytest.raises(ConfigError, match="unknown groups: nope"):
        gateway(fakes, 1, fallbacks=("nope",))
    with pytest.raises(ConfigError, match="names must be unique"):
        GatewayLLM(
            LLMSettings(
                provider="gateway",
                model="chat",
                gateway=GatewaySettings(
                    upstreams=tuple(UpstreamSettings(base_url=fakes[0].url, model="chat", name="x") for _ in range(2))
                ),
            )
        )


async def test_the_api_key_never_reaches_the_snapshot_or_errors(fakes: list[FakeUpstream]) -> None:
    fakes[0].configure(failure_rate=1.0, failure_kind="500")
    llm = gateway(fakes, 1, upstream={"api_key": "sk-secret-123"}, retries=0)
    with pytest.raises(UpstreamError) as err:
        await llm.complete(MSGS, P)
    assert "sk-secret" not in str(err.value)
    assert "sk-secret" not in repr(await llm.upstreams())
    await llm.aclose()
