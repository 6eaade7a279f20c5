"""``GatewayLLM``: the LLM protocol over the gateway's upstreams (``llm.provider: gateway``).

The chat wire format is :class:`~ragline.llm.openai.OpenAILLM`'s, one per upstream, on the
upstream's own pooled client and with its retries off: retrying, failing over, limits and breakers
are the gateway's.  A stream fails over only before its first token — after that a failure reaches
the caller, never a silent replay.  When every group failed and ``llm.extractive_fallback`` is on,
the extractive answerer answers instead, marked ``finish_reason="fallback"`` so no cache keeps it.

Tokens are charged against tpm at admission as an upper bound (the prompt at ~4 characters per
token plus ``max_tokens``) and corrected with the usage the upstream reports.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

from ragline.config import LLMSettings
from ragline.errors import ServiceUnavailable, UpstreamError
from ragline.gateway import Gateway, classify
from ragline.gateway.state import NEUTRAL, OK, State
from ragline.gateway.upstream import Upstream
from ragline.llm.base import FALLBACK_FINISH, Completion, GenParams, StreamChunk
from ragline.llm.extractive import ExtractiveLLM
from ragline.llm.openai import OpenAILLM
from ragline.types import Message

__all__ = ["GatewayLLM"]


def estimate_tokens(messages: list[Message], params: GenParams) -> int:
    """An upper-bound charge for tpm: the prompt (~4 characters per token) plus ``max_tokens``."""
    return sum(len(m.get("content") or "") for m in messages) // 4 + 4 * len(messages) + params.max_tokens


class GatewayLLM:
    def __init__(self, settings: LLMSettings, *, state: State | None = None, transport: Any = None) -> None:
        self.gateway = Gateway(settings.gateway, state=state, kind="llm", transport=transport)
        self.group = settings.model
        self.gateway.chain(self.group)  # a primary group no upstream serves is a start-up error
        self.id = f"gateway:{self.group}"
        self._clients = {u.name: OpenAILLM(_wire_settings(u), client=u.client) for u in self.gateway.upstreams}
        self._fallback = ExtractiveLLM(settings) if settings.extractive_fallback else None

    async def complete(self, messages: list[Message], params: GenParams) -> Completion:
        async def call(up: Upstream) -> Completion:
            return await self._clients[up.name].complete(messages, dataclasses.replace(params, model=up.model))

        try:
            done, ticket = await self.gateway.call(self.group, call, estimate_tokens(messages, params))
        except (UpstreamError, ServiceUnavailable):
            if self._fallback is None:
                raise
            fb = await self._fallback.complete(messages, params)
            return dataclasses.replace(fb, finish_reason=FALLBACK_FINISH, upstream="extractive")
        await ticket.finish(OK, done.usage.total_tokens)
        return dataclasses.replace(done, upstream=ticket.upstream.name)

    async def stream(self, messages: list[Message], params: GenParams) -> AsyncIterator[StreamChunk]:
        async def open_stream(up: Upstream) -> tuple[AsyncIterator[StreamChunk], StreamChunk, float]:
            agen = self._clients[up.name].stream(messages, dataclasses.replace(params, model=up.model))
            try:
                first = await anext(agen)  # inside the gateway's retry loop: no token has left yet
            except BaseException:
                await agen.aclose()  # type: ignore[attr-defined]
                raise
            return agen, first, time.perf_counter()

        try:
            (agen, chunk, t_first), ticket = await self.gateway.call(
                self.group, open_stream, estimate_tokens(messages, params)
            )
        except (UpstreamError, ServiceUnavailable):
            if self._fallback is None:
                raise
            async for piece in self._fallback.stream(messages, params):
                if piece.finish_reason is not None:
                    piece = dataclasses.replace(piece, finish_reason=FALLBACK_FINISH, upstream="extractive")
                yield piece
            return
        name = ticket.upstream.name
        outcome, used = NEUTRAL, None
        try:
            while True:
                if chunk.usage is not None:
                    used = chunk.usage.total_tokens
                if chunk.finish_reason is not None:
                    chunk = dataclasses.replace(chunk, upstream=name)
                yield chunk
                try:
                    chunk = await anext(agen)
                except StopAsyncIteration:
                    break
            outcome = OK
        except UpstreamError as exc:
            outcome = classify(exc)[0]
            raise
        finally:
            await agen.aclose()  # type: ignore[attr-defined]
            await ticket.finish(outcome, used, t_first - ticket.t0)

    async def upstreams(self) -> dict[str, Any]:
        return await self.gateway.snapshot()

    async def aclose(self) -> None:
        await self.gateway.aclose()


def _wire_settings(up: Upstream) -> LLMSettings:
    s = up.settings
    return LLMSettings(
        provider="openai",
        base_url=s.base_url,
        model=s.model,
        api_key=s.api_key,
        timeout_s=s.timeout_s,
        connect_timeout_s=s.connect_timeout_s,
        max_connections=s.max_connections,
        retries=0,
    )
