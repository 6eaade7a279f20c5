"""The fake upstream's configuration, fault model and pure reply helpers (no I/O).

Split from ``fake_upstream`` (the ASGI server and its in-process control) so
that each stays small; everything here is re-exported there.
"""

from __future__ import annotations

import hashlib
from collections import Counter, deque
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

__all__ = [
    "FAULT_KINDS",
    "Fault",
    "Stats",
    "UpstreamConfig",
    "check_kind",
    "default_reply",
    "embed_text",
    "fmt_seconds",
    "tokenize",
]

FAULT_KINDS = ("429", "timeout", "malformed")
"""Fault kinds besides 5xx statuses (any string "500".."599")."""


@dataclass
class UpstreamConfig:
    """Everything that shapes the fake's answers; every field is settable via ``/_control``."""

    model: str = "fake-model"
    latency_ms: float = 0.0
    """Delay before the first token (streaming) or before the whole reply."""
    tps: float = 0.0
    """Tokens per second after the first-token latency; 0 means unlimited."""
    reply: str | None = None
    """Fixed reply text; ``None`` derives a deterministic reply from the last user message."""
    embedding_dim: int = 384
    failure_rate: float = 0.0
    """Probability that a request (chat or embeddings) fails with ``failure_kind``."""
    failure_kind: str = "500"
    retry_after: float | None = 1.0
    """``Retry-After`` seconds sent with random 429s (``None`` omits the header)."""
    hang_s: float = 300.0
    """How long a ``timeout`` fault hangs at most (it ends early when the client disconnects)."""
    seed: int = 0
    """Seeds the random failure draws, so a benchmark run is reproducible."""
    failure_kinds: tuple[str, ...] = ()
    """When set, each random failure draws its kind from these (e.g. ``("500", "503", "timeout")``)."""
    concurrency: int = 0
    """Requests processed at once (0: unlimited); the rest queue, like a model server with N slots."""
    embed_ms_per_input: float = 0.0
    """Extra embedding time per input text, on top of ``latency_ms`` (a batch costs more than one text)."""

    def update(self, values: dict[str, Any]) -> UpstreamConfig:
        """A copy with ``values`` applied; unknown keys or bad kinds raise ``ValueError``."""
        names = {f.name for f in fields(self)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown config field(s): {sorted(unknown)}")
        if "failure_kinds" in values:
            values = {**values, "failure_kinds": tuple(str(k) for k in values["failure_kinds"] or ())}
        new = replace(self, **values)
        check_kind(new.failure_kind)
        for k in new.failure_kinds:
            check_kind(k)
        if new.concurrency < 0 or new.embed_ms_per_input < 0:
            raise ValueError("concurrency and embed_ms_per_input must be >= 0")
        if not 0.0 <= new.failure_rate <= 1.0:
            raise ValueError("failure_rate must be within [0, 1]")
        if new.embedding_dim < 1 or new.tps < 0 or new.latency_ms < 0:
            raise ValueError("embedding_dim must be >= 1; tps and latency_ms >= 0")
        return new


@dataclass(frozen=True)
class Fault:
    """One queued failure; ``route`` limits it to ``"chat"`` or ``"embeddings"``."""

    kind: str
    retry_after: float | None = None
    route: str | None = None


def check_kind(kind: str) -> None:
    """``ValueError`` unless ``kind`` is a known fault kind or a 5xx status."""
    if kind in FAULT_KINDS or (kind.isdigit() and 500 <= int(kind) <= 599):
        return
    raise ValueError(f"unknown fault kind {kind!r}: use 429, 5xx, timeout or malformed")


@dataclass
class Stats:
    """Request counters of one fake (reset by ``FakeUpstream.reset``)."""

    total: int = 0
    routes: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    clients: set[tuple[str, int]] = field(default_factory=set)
    arrivals: deque[tuple[float, str, str, int]] = field(default_factory=lambda: deque(maxlen=500_000))
    """(epoch seconds, route, outcome, tokens) of every API request as it arrived, oldest first."""
    early: int = 0
    """Requests that arrived while a Retry-After this fake had sent was still running."""
    retry_after_until: float = 0.0


def default_reply(messages: list[dict[str, Any]]) -> str:
    """A deterministic answer to the last user message that cites source [1].

    It quotes the question (the text after ``Question:`` in ragline's prompt, or
    the whole message) so tests can tell replies apart and check citations.
    """
    content = ""
    for m in reversed(messages):
        if m.get("role") == "user":
            c = m.get("content")
            content = c if isinstance(c, str) else ""
            break
    _, sep, question = content.rpartition("Question: ")
    words = (question if sep else content).split()[:16]
    topic = " ".join(words) if words else "your question"
    return f"According to the sources, the answer to {topic} is given in the first source [1]."


def tokenize(text: str) -> list[str]:
    """Split a reply into stream tokens: words with their leading space."""
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)] if text else []


def embed_text(text: str, dim: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    """A unit vector seeded by blake2b(text): same input, same vector, in any process."""
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    v /= np.linalg.norm(v) or 1.0
    return v


def fmt_seconds(s: float) -> bytes:
    return str(int(s) if float(s).is_integer() else s).encode()
