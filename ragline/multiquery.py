"""Multi-query retrieval: variations of a query, retrieved next to it and fused with RRF.

With ``retrieval.multi_query`` the hybrid retriever (:class:`ragline.retrieve.HybridRetriever`) asks
a :class:`MultiQuery` for up to ``retrieval.multi_query_n`` variations of each query it runs.  Each
variation is embedded (through the embedding cache) and searched densely; its candidate lists join the
original query's in one reciprocal rank fusion.

Where the variations come from:

* an LLM, when one is configured (``llm.provider`` other than ``extractive``): one completion through
  the LLM response cache (deterministic at temperature 0, so a query's variations are computed once).
  They are searched **densely only**: an LLM paraphrase brings words the original did not have, and a
  cached retrieval's dependency record covers the original query's terms; a keyword list on new
  words would let a corpus change that adds them go unnoticed.
* cheap rewrites otherwise (:func:`cheap_variants`, no model): the content words (stop words and
  punctuation stripped), the three longest distinct keywords, and the longest
  noun-phrase-like run of content words.  Each is a subset of the original query's terms, so they are
  searched by keyword too, and a dependency record's terms still cover every list.

Either way the fused retrieval reports no cutoffs (other vectors' lists took part), which makes the
cache's invalidation conservative for it: any new chunk of the tenant re-verifies it.  Whether this
helps is measured in ``benchmarks/multi_query.py`` (docs/NOTES.md); it is off by default.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable

from ragline.errors import RaglineError
from ragline.types import Message, Vectors

__all__ = ["MultiQuery", "cheap_variants", "parse_variants", "variant_messages"]

log = logging.getLogger("ragline.multiquery")

EmbedFn = Callable[[str, str], Awaitable[Vectors]]
"""(tenant, text) → the text's query vector."""
CompleteFn = Callable[[str, list[Message]], Awaitable[str]]
"""(tenant, messages) → the LLM's reply text."""

MAX_VARIANT_CHARS = 300
"""A variation longer than this (a rambling LLM line) is cut: it is a query, not a document."""

STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers herself him himself his how i if in into is it its itself just me more most
    my myself no nor not of off on once only or other our ours ourselves out over own same she should so
    some such than that the their theirs them themselves then there these they this those through to too
    under until up very was we were what when where which while who whom whose why will with would you
    your yours yourself yourselves tell show explain describe give list find many much does did also
    there's what's isn't aren't don't doesn't""".split()
)
"""English function words and question scaffolding (``how``, ``tell``, ``explain``) that carry no topic."""

_WORD = re.compile(r"[^\W_](?:[\w'\-]*[^\W_])?")
_NUMBERED = re.compile(r"^\s*(?:[-*•]|\(?\d{1,2}[.):])\s*")


def _words(query: str) -> list[str]:
    return _WORD.findall(query)


def _content(words: list[str]) -> list[str]:
    return [w for w in words if w.lower() not in STOP_WORDS]


def cheap_variants(query: str, n: int) -> list[str]:
    """Up to ``n`` (at most 3) rewrites of ``query`` without a model, distinct from it and each other:
    content words, the three longest distinct keywords, and the longest run of consecutive content
    words (a noun-phrase stand-in).  A query that has nothing to strip gets fewer (or none)."""
    words = _words(query)
    content = _content(words)
    seen: set[str] = set()
    distinct: list[str] = []
    for w in content:
        if len(w) >= 4 and not w.isdigit() and w.lower() not in seen:
            seen.add(w.lower())
            distinct.append(w)
    longest = set(sorted(distinct, key=len, reverse=True)[:3])
    keywords = [w for w in distinct if w in longest]  # the (up to) three longest, in query order
    runs: list[list[str]] = [[]]
    for w in words:
        if w.lower() in STOP_WORDS:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append(w)
    phrase = max(runs, key=len)
    out: list[str] = []
    taken = {_norm(query)}
    for cand in (" ".join(content), " ".join(keywords), " ".join(phrase)):
        norm = _norm(cand)
        if norm and norm not in taken and len(out) < n:
            taken.add(norm)
            out.append(cand)
    return out


def _norm(text: str) -> str:
    return " ".join(w.lower() for w in _words(text))


def variant_messages(query: str, n: int) -> list[Message]:
    """The prompt that asks an LLM for ``n`` rephrasings of a search query, one per line."""
    return [
        {
            "role": "system",
            "content": "You rewrite search queries for a document search engine. Reply with the rewrites only, "
            "one per line, no numbering and no commentary.",
        },
        {
            "role": "user",
            "content": f"Write {n} different rephrasings of this search query, using other words for the same "
            f"information need:\n{query}",
        },
    ]


def parse_variants(reply: str, query: str, n: int) -> list[str]:
    """The first ``n`` usable lines of an LLM reply: numbering and quotes stripped, empty lines,
    repeats and copies of the query dropped, each at most :data:`MAX_VARIANT_CHARS`."""
    out: list[str] = []
    taken = {_norm(query)}
    for line in reply.splitlines():
        text = _NUMBERED.sub("", line).strip().strip("\"'“”").strip()[:MAX_VARIANT_CHARS]
        norm = _norm(text)
        if norm and norm not in taken:
            taken.add(norm)
            out.append(text)
            if len(out) == n:
                break
    return out


class MultiQuery:
    """The variations of a query with their vectors (the ``expand`` hook of the hybrid retriever)."""

    def __init__(self, n: int, embed: EmbedFn, complete: CompleteFn | None = None) -> None:
        self.n = n
        self._embed = embed
        self._complete = complete

    async def variants(self, tenant: str, query: str) -> list[tuple[str, bool]]:
        """(text, searched by keyword too) of each variation: the LLM's, else cheap rewrites."""
        if self._complete is not None:
            try:
                reply = await self._complete(tenant, variant_messages(query, self.n))
                texts = parse_variants(reply, query, self.n)
                if texts:
                    return [(t, False) for t in texts]
            except RaglineError as exc:  # the LLM is down or refused: retrieval still works without it
                log.warning("multi-query: the LLM gave no variations (%s); using cheap rewrites", exc.code)
        return [(t, True) for t in cheap_variants(query, self.n)]

    async def __call__(self, tenant: str, query: str) -> list[tuple[str, Vectors, bool]]:
        """(text, vector, searched by keyword too) of each variation, embedded concurrently."""
        found = await self.variants(tenant, query)
        vecs = await asyncio.gather(*(self._embed(tenant, t) for t, _ in found))
        return [(t, v, kw) for (t, kw), v in zip(found, vecs, strict=True)]
