"""Fast, deterministic stand-ins for the model-backed components, for tests.

``HashEmbedder`` implements the ``Embedder`` protocol with hashed word and
character-trigram features (no model, microseconds per text): equal texts get
equal vectors and texts sharing words or word pieces get close ones, so hybrid
retrieval, the semantic cache and dependency-driven invalidation behave as
they do with a real model, only much faster.  ``ScriptedLLM`` implements the
``LLM`` protocol with scripted or echoed answers and counts its calls, which
is what cache tests need ("an exact hit makes no LLM call").

    async with AsyncRAG(settings, embedder=HashEmbedder(), llm=ScriptedLLM()) as rag:
        ...
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from ragline.llm.base import Completion, GenParams, StreamChunk
from ragline.llm.prompt import parse_prompt
from ragline.types import Message, Usage, Vectors

__all__ = ["HashEmbedder", "ScriptedLLM", "echo_reply"]

_WORD = re.compile(r"\w+")
_TRIGRAM_WEIGHT = 0.5


@lru_cache(maxsize=65536)
def _slot(feature: str, dim: int) -> tuple[int, float]:
    """The (index, sign) a feature hashes to: the same in every process."""
    h = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
    return h % dim, (1.0 if (h >> 63) & 1 else -1.0)


def _default_tokenizer_file() -> Path:
    """The tokenizer of the default embedder (a data file of an installed package; no model is loaded)."""
    from ragline.config import EmbedderSettings
    from ragline.embed.local import resolve_model_dir

    return resolve_model_dir(EmbedderSettings().model) / "tokenizer.json"


class HashEmbedder:
    """Feature-hashing embedder: word unigrams plus character trigrams of each word.

    Vectors are L2-normalised float32 of shape ``(len(texts), dim)``; a text
    without any word character gets a one-hot vector from a hash of the text.
    ``tokenizer_file`` (what the pipeline chunks with) defaults to the default
    embedder's ``tokenizer.json``, so chunk boundaries match a real deployment.
    ``calls`` and ``texts_embedded`` count work, as ``LocalEmbedder``'s do.
    """

    def __init__(
        self, dim: int = 384, *, model_id: str | None = None, tokenizer_file: str | Path | None = None
    ) -> None:
        if dim < 8:
            raise ValueError("dim must be >= 8")
        self.dim = dim
        self.id = model_id or f"hash:v1:{dim}"
        self._tokenizer_file = Path(tokenizer_file) if tokenizer_file is not None else None
        self._lock = threading.Lock()
        self.calls = 0
        self.texts_embedded = 0

    @property
    def tokenizer_file(self) -> Path:
        if self._tokenizer_file is None:
            self._tokenizer_file = _default_tokenizer_file()
        return self._tokenizer_file

    def embed_one(self, text: str) -> Vectors:
        v = np.zeros(self.dim, dtype=np.float32)
        for word in _WORD.findall(text.casefold()):
            i, s = _slot("w:" + word, self.dim)
            v[i] += s
            padded = f"<{word}>"
            for j in range(len(padded) - 2):
                i, s = _slot("t:" + padded[j : j + 3], self.dim)
                v[i] += s * _TRIGRAM_WEIGHT
        norm = float(np.linalg.norm(v))
        if norm == 0.0:
            v[_slot("raw:" + text, self.dim)[0]] = 1.0
            return v
        v /= norm
        return v

    def embed(self, texts: list[str]) -> Vectors:
        with self._lock:
            self.calls += 1
            self.texts_embedded += len(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self.embed_one(t) for t in texts]).astype(np.float32, copy=False)


def echo_reply(messages: Sequence[Message]) -> str:
    """A deterministic answer built from ragline's prompt: the question and the first source, cited."""
    question, sources = parse_prompt(list(messages))
    if not sources:
        return f"I do not know the answer to: {question}"
    first = " ".join(sources[0].split())[:200]
    return f"Asked {question!r}: {first} [1]"


Script = Sequence[str] | Mapping[str, str] | Callable[[list[Message]], str]


class ScriptedLLM:
    """An LLM whose answers are scripted: a list (used in order, then echo), a mapping (the first key
    found in the question selects the reply, else echo), a function of the messages, or, by
    default, ``echo_reply``.

    ``calls`` counts ``complete`` plus ``stream`` calls; ``prompts`` keeps every call's messages;
    ``max_in_flight`` is the highest number of concurrent calls seen.  ``delay_s`` makes each call
    take that long (to hold requests in flight, e.g. for single-flight tests); ``fail_with`` makes
    the next calls raise it.
    """

    def __init__(
        self,
        script: Script | None = None,
        *,
        model_id: str = "scripted",
        delay_s: float = 0.0,
        fail_with: BaseException | None = None,
    ) -> None:
        self.id = model_id
        self._script = script
        self._position = 0
        self.delay_s = delay_s
        self.fail_with = fail_with
        self.calls = 0
        self.complete_calls = 0
        self.stream_calls = 0
        self.prompts: list[list[Message]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.closed = False

    def reply_for(self, messages: list[Message]) -> str:
        script = self._script
        if script is None:
            return echo_reply(messages)
        if callable(script):
            return script(messages)
        if isinstance(script, Mapping):
            question, _ = parse_prompt(messages)
            for needle, reply in script.items():
                if needle in question:
                    return reply
            return echo_reply(messages)
        if self._position < len(script):
            self._position += 1
            return script[self._position - 1]
        return echo_reply(messages)

    def _begin(self, messages: list[Message]) -> None:
        self.calls += 1
        self.prompts.append(list(messages))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    async def _wait(self) -> None:
        if self.delay_s > 0:
            await asyncio.sleep(self.delay_s)
        if self.fail_with is not None:
            raise self.fail_with

    @staticmethod
    def _tokens(text: str, params: GenParams) -> tuple[list[str], str]:
        words = text.split(" ")
        tokens = [w if i == 0 else " " + w for i, w in enumerate(words)] if text else []
        if 0 < params.max_tokens < len(tokens):
            return tokens[: params.max_tokens], "length"
        return tokens, "stop"

    @staticmethod
    def _usage(messages: list[Message], n_tokens: int) -> Usage:
        prompt = sum(len(m.get("content", "").split()) for m in messages)
        return Usage(prompt_tokens=prompt, completion_tokens=n_tokens)

    async def complete(self, messages: list[Message], params: GenParams) -> Completion:
        self._begin(messages)
        self.complete_calls += 1
        try:
            await self._wait()
            tokens, finish = self._tokens(self.reply_for(messages), params)
            return Completion("".join(tokens), self._usage(messages, len(tokens)), params.model or self.id, finish)
        finally:
            self.in_flight -= 1

    async def stream(self, messages: list[Message], params: GenParams) -> AsyncIterator[StreamChunk]:
        self._begin(messages)
        self.stream_calls += 1
        try:
            await self._wait()
            tokens, finish = self._tokens(self.reply_for(messages), params)
            for tok in tokens:
                yield StreamChunk(tok)
                await asyncio.sleep(0)
            yield StreamChunk("", self._usage(messages, len(tokens)), finish)
        finally:
            self.in_flight -= 1

    async def aclose(self) -> None:
        self.closed = True
