"""Extractive answerer: the default LLM when no model server is configured.

It implements the LLM protocol but generates nothing: it picks the sentences
of the packed sources that best match the question (BM25 over sentences with
a light stemmer, plus a mild prior for higher-ranked sources) and cites each
one.  Deterministic, offline, milliseconds — so ragline answers with citations
out of the box, and every cache path can be exercised without a model.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator

from ragline.config import LLMSettings
from ragline.llm.base import Completion, GenParams, StreamChunk
from ragline.llm.prompt import parse_prompt
from ragline.types import Message, Usage

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


_HEADING = re.compile(r"^\s{0,3}#{1,6}\s")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: a blank line ends one (wrapped lines do not), Markdown headings are dropped."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        body = " ".join(line for line in para.splitlines() if not _HEADING.match(line))
        out.extend(s.strip() for s in _SENT.split(" ".join(body.split())) if len(s.strip()) > 2)
    return out


def extract(question: str, sources: list[str], n: int) -> str:
    """The answer text: up to ``n`` best sentences, each followed by its citation.

    Sentences are scored with BM25 over the sentences of the sources (k1 1.2,
    b 0.75: a long run-on list does not win by containing every term once),
    times a mild prior for better-ranked sources.  Fragments under five words
    (titles, captions) are not answers.
    """
    q = set(terms(question))
    if not sources or not q:
        return NO_ANSWER
    df: dict[str, int] = {}
    sents: list[tuple[int, int, str, list[str]]] = []
    for si, src in enumerate(sources):
        for pos, sent in enumerate(split_sentences(src)):
            if len(sent.split()) < 5:
                continue
            ts = terms(sent)
            sents.append((si, pos, sent, ts))
            for t in set(ts) & q:
                df[t] = df.get(t, 0) + 1
    if not sents:
        return NO_ANSWER
    avg = sum(len(ts) for *_, ts in sents) / len(sents) or 1.0
    cands: list[tuple[float, int, int, str]] = []
    for si, pos, sent, ts in sents:
        score = 0.0
        for t in q:
            tf = ts.count(t)
            if tf:
                idf = math.log(1 + (len(sents) - df[t] + 0.5) / (df[t] + 0.5))
                score += idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * len(ts) / avg))
        if score > 0:
            cands.append((score / (1.0 + 0.05 * si), si, pos, sent))  # mild prior; MMR order is not relevance
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
