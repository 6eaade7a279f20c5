"""CachedLLM: the LLM response cache in front of a chat model (DESIGN.md §2 step 7).

The key covers the model, every output parameter and the full prompt (which
carries its context), so a cached response is never stale: invalidation does
not touch this cache.  Responses are cached only for deterministic parameters
(unless the cache allows more), and only when they ran to completion
(``stop``/``length``) — a completed stream is cached like a completion.

Modes: ``default`` reads and writes, ``refresh`` writes without reading,
``bypass`` neither.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import orjson

from ragline import metrics
from ragline.config import LLMSettings
from ragline.llm.base import LLM, Completion, GenParams, StreamChunk
from ragline.types import CacheMode, Message, Usage

_COMPLETE = ("stop", "length")


class ResponseCache(Protocol):
    def cacheable_llm(self, temperature: float) -> bool: ...

    def llm_key(self, tenant: str, params: dict[str, Any], messages: list[dict[str, str]]) -> str: ...

    async def get(self, key: str, skip_l1: bool = False) -> tuple[bytes | None, str | None]: ...

    async def put(self, key: str, value: bytes) -> None: ...

    def count(self, name: str, n: int = 1) -> None: ...


class CachedLLM:
    def __init__(self, llm: LLM, cache: ResponseCache | None, settings: LLMSettings) -> None:
        self.llm = llm
        self.cache = cache
        self.settings = settings

    @property
    def id(self) -> str:
        return self.llm.id

    def params(self) -> GenParams:
        s = self.settings
        return GenParams(model=s.model, temperature=s.temperature, max_tokens=s.max_tokens, top_p=s.top_p)

    def _key(self, tenant: str, params: GenParams, messages: list[Message], mode: CacheMode) -> str | None:
        cache = self.cache
        if cache is None or mode == "bypass" or not cache.cacheable_llm(params.temperature):
            return None
        return cache.llm_key(
            tenant,
            {
                "model": params.model,
                "t": params.temperature,
                "n": params.max_tokens,
                "p": params.top_p,
                "s": list(params.stop),
            },
            messages,
        )

    async def _cached(self, key: str | None, mode: CacheMode) -> Completion | None:
        if key is None or mode != "default" or self.cache is None:
            return None
        body, _ = await self.cache.get(key)
        if body is None:
            return None
        d = orjson.loads(body)
        usage = Usage(**d["usage"])
        self.cache.count("llm_calls_saved")
        self.cache.count("llm_tokens_saved", usage.total_tokens)
        metrics.LLM_SAVED.inc()
        return Completion(d["text"], usage, d["model"], d["finish"])

    async def _store(self, key: str | None, text: str, model: str, finish: str | None, usage: Usage) -> None:
        metrics.LLM_CALLS.labels("ok").inc()
        metrics.LLM_TOKENS.labels("prompt").inc(usage.prompt_tokens)
        metrics.LLM_TOKENS.labels("completion").inc(usage.completion_tokens)
        if key is not None and self.cache is not None and finish in _COMPLETE:
            await self.cache.put(
                key,
                orjson.dumps(
                    {
                        "text": text,
                        "model": model,
                        "finish": finish,
                        "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens},
                    }
                ),
            )

    async def complete(
        self, tenant: str, messages: list[Message], mode: CacheMode = "default", timings: dict[str, float] | None = None
    ) -> Completion:
        params = self.params()
        key = self._key(tenant, params, messages, mode)
        hit = await self._cached(key, mode)
        if hit is not None:
            return hit
        with metrics.stage("generate", timings):
            done = await self.llm.complete(messages, params)
        await self._store(key, done.text, done.model, done.finish_reason, done.usage)
        return done

    async def stream(
        self, tenant: str, messages: list[Message], mode: CacheMode = "default"
    ) -> AsyncIterator[StreamChunk]:
        """The model's deltas; a cached response arrives as one chunk with its usage and finish reason."""
        params = self.params()
        key = self._key(tenant, params, messages, mode)
        hit = await self._cached(key, mode)
        if hit is not None:
            yield StreamChunk(hit.text, hit.usage, hit.finish_reason)
            return
        parts: list[str] = []
        usage = Usage()
        finish: str | None = None
        async for piece in self.llm.stream(messages, params):
            if piece.delta:
                parts.append(piece.delta)
            if piece.usage is not None:
                usage = piece.usage
            if piece.finish_reason is not None:
                finish = piece.finish_reason
            yield piece
        await self._store(key, "".join(parts), self.llm.id, finish, usage)

    async def stream_to(
        self,
        send: Callable[[str], None],
        tenant: str,
        messages: list[Message],
        mode: CacheMode = "default",
        timings: dict[str, float] | None = None,
    ) -> Completion:
        """Stream a generation into ``send`` (one call per delta); the completion it added up to.

        Times ``first_token`` and ``generate`` like a completion is timed.
        """
        parts: list[str] = []
        usage = Usage()
        finish: str | None = None
        upstream = ""
        t0 = time.perf_counter()
        first = True
        with metrics.stage("generate", timings):
            async for piece in self.stream(tenant, messages, mode):
                if first and timings is not None:
                    timings["first_token"] = round((time.perf_counter() - t0) * 1000, 3)
                first = False
                if piece.delta:
                    parts.append(piece.delta)
                    send(piece.delta)
                if piece.usage is not None:
                    usage = piece.usage
                if piece.finish_reason is not None:
                    finish = piece.finish_reason
                    upstream = piece.upstream
        return Completion("".join(parts), usage, self.llm.id, finish or "", upstream)

    async def aclose(self) -> None:
        await self.llm.aclose()
