"""The LLM extension point: ``complete`` and ``stream`` over chat messages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ragline.types import Message, Usage


@dataclass(frozen=True, slots=True)
class GenParams:
    """Every parameter that changes the output; all of it goes into the LLM cache key."""

    model: str
    temperature: float = 0.0
    max_tokens: int = 512
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


FALLBACK_FINISH = "fallback"
"""``finish_reason`` of an answer the gateway's extractive last resort gave: never cached."""


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    usage: Usage
    model: str
    finish_reason: str = "stop"
    upstream: str = ""
    """Which upstream answered (the gateway sets it; empty for a single model)."""


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """One streamed delta; the last chunk carries ``usage`` and ``finish_reason``."""

    delta: str
    usage: Usage | None = None
    finish_reason: str | None = None
    upstream: str = ""
    """On the last chunk: which upstream answered."""


@runtime_checkable
class LLM(Protocol):
    """A chat model.  ``id`` names it for cache keys and metrics."""

    id: str

    async def complete(self, messages: list[Message], params: GenParams) -> Completion: ...

    def stream(self, messages: list[Message], params: GenParams) -> AsyncIterator[StreamChunk]: ...

    async def aclose(self) -> None: ...
