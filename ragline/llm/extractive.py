"""Extractive answerer: the default LLM when no model server is configured.

It implements the LLM protocol but generates nothing: it picks the sentences
of the packed sources that best match the question (BM25-style term overlap
with a light stemmer, plus a prior for higher-ranked sources) and cites each
one.  Deterministic, offline, milliseconds — so ragline answers with citations
out of the box, and every cache path can be exercised without a model.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator

from ragline.config import LLMSettings
from ragline.llm.base import Completion, GenParams, Message, StreamChunk
from ragline.llm.prompt import parse_prompt
from ragline.types import Usage

_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\"'])")
_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    """
    a an and are as at be been but by can could did do does for from had has have how i if in into
    is it its of on or so such than that the their them then there these they this to was were what
    when where which who whom why will with would you your
    """.split()
)
NO_ANSWER = "I could not find an answer in the indexed documents."


def _stem(w: str) -> str:
    for suf in ("ingly", "edly", "ing", "ies", "ied", "ed", "es", "ly", "s"):
        if w.endswith(suf) and len(w) - len(suf) >= 3:
            return w[: -len(suf)] + ("y" if suf in ("ies", "ied") else "")
    return w


def terms(text: str) -> list[str]:
    return [_stem(w) for w in _WORD.findall(text.lower()) if w not in _STOP]


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENT.split(" ".join(text.split())) if len(s.strip()) > 2]


def extract(question: str, sources: list[str], n: int) -> str:
    """The answer text: up to ``n`` best sentences, each followed by its citation."""
    q = set(terms(question))
    if not sources or not q:
        return NO_ANSWER
    cands: list[tuple[float, int, int, str]] = []
    df: dict[str, int] = {}
    sent_terms: list[tuple[int, int, str, set[str]]] = []
    for si, src in enumerate(sources):
        for pos, sent in enumerate(split_sentences(src)):
            ts = set(terms(sent))
            sent_terms.append((si, pos, sent, ts))
            for t in ts & q:
                df[t] = df.get(t, 0) + 1
    total = max(len(sent_terms), 1)
    for si, pos, sent, ts in sent_terms:
        overlap = ts & q
        if not overlap:
            continue
        score = sum(math.log(1 + total / df[t]) for t in overlap)
        score *= 1.0 / (1.0 + 0.15 * si)  # prior: better-ranked sources first
        cands.append((score, si, pos, sent))
    if not cands:
        return NO_ANSWER
    best = sorted(cands, key=lambda c: -c[0])[:n]
    best.sort(key=lambda c: (c[1], c[2]))  # read in source order
    return " ".join(f"{sent} [{si + 1}]" for _, si, _, sent in best)


class ExtractiveLLM:
    """LLM protocol over ``extract``; token usage counts whitespace words."""

    def __init__(self, settings: LLMSettings) -> None:
        self.sentences = settings.extractive_sentences
        self.id = f"extractive:{self.sentences}"

    async def complete(self, messages: list[Message], params: GenParams) -> Completion:
        question, sources = parse_prompt(messages)
        text = extract(question, sources, self.sentences)
        prompt_tokens = sum(len(m["content"].split()) for m in messages)
        return Completion(text, Usage(prompt_tokens, len(text.split())), self.id)

    async def stream(self, messages: list[Message], params: GenParams) -> AsyncIterator[StreamChunk]:
        done = await self.complete(messages, params)
        words = done.text.split(" ")
        for i, w in enumerate(words):
            yield StreamChunk(w if i == 0 else " " + w)
        yield StreamChunk("", usage=done.usage, finish_reason="stop")

    async def aclose(self) -> None:
        return None
