"""Request validation: a call's arguments become one validated :class:`~ragline.types.Query`.

Every limit a user controls (query length, k, history size and shape) is checked here, once, with an
error that says what to fix; the pipeline below trusts a ``Query``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ragline.canonical import query_form
from ragline.config import Settings
from ragline.errors import InvalidInput, PayloadTooLarge
from ragline.types import CacheMode, Message, Query

_SURROGATE = re.compile("[\ud800-\udfff]")


def check_unicode(text: str, what: str) -> None:
    """``InvalidInput`` if ``text`` holds a lone UTF-16 surrogate (``\\ud800``, or the bytes ED A0 80 decoded
    leniently): such a string cannot be encoded as UTF-8, so it could be neither stored, indexed nor hashed."""
    if not text.isascii():
        m = _SURROGATE.search(text)
        if m is not None:
            raise InvalidInput(
                f"{what} contains a lone UTF-16 surrogate (U+{ord(m.group()):04X}) at position {m.start()}; "
                "send valid Unicode text"
            )


def build_query(
    settings: Settings,
    query: str | Query,
    k: int | None,
    tenant: str,
    history: Sequence[Message],
    cache_mode: CacheMode,
    timings: bool = True,
    doc_level: bool = False,
    mmr: bool | None = None,
    candidates: int | None = None,
) -> Query:
    """The validated :class:`Query` of a call (``k`` and ``mmr`` resolved, ``history`` checked); the
    fields of a ``Query`` passed as ``query`` win over the other arguments."""
    raw = ""
    if isinstance(query, Query):
        q = query
        raw = q.raw
        query, k, tenant, history, cache_mode = q.text, q.k, q.tenant, q.history, q.cache_mode
        timings, doc_level, mmr, candidates = q.timings, q.doc_level, q.mmr, q.candidates
    lim = settings.limits
    if not isinstance(query, str) or not query.strip():
        raise InvalidInput("query is empty: send a non-empty 'query' string")
    if len(query) > lim.max_query_chars:
        raise PayloadTooLarge(f"query has {len(query)} characters; the limit is {lim.max_query_chars}")
    check_unicode(query, "query")
    if k is None:
        k = settings.retrieval.k
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= lim.max_k:
        raise InvalidInput(f"k must be an integer between 1 and {lim.max_k}, got {k!r}")
    hist = check_history(history, lim.max_history_messages, lim.max_history_chars) if history else ()
    mmr = settings.retrieval.mmr if mmr is None else mmr
    text = query_form(query)  # once per request: what cannot change an answer is absorbed here
    return Query(text, k, tenant, hist, cache_mode, timings, doc_level, mmr, candidates, raw or query, text.casefold())


def check_history(history: Sequence[Message], limit: int, max_chars: int | None = None) -> tuple[Message, ...]:
    if len(history) > limit:
        raise PayloadTooLarge(f"history has {len(history)} messages; the limit is {limit}")
    out: list[Message] = []
    total = 0
    for i, m in enumerate(history):
        if (
            not isinstance(m, dict)
            or m.get("role") not in ("user", "assistant")
            or not isinstance(m.get("content"), str)
        ):
            raise InvalidInput(f"history[{i}] must be {{'role': 'user'|'assistant', 'content': str}}")
        total += len(m["content"])
        if max_chars is not None and total > max_chars:
            raise PayloadTooLarge(
                f"history holds over {max_chars:,} characters (limits.max_history_chars) at message {i}; "
                "send fewer or shorter messages"
            )
        check_unicode(m["content"], f"history[{i}].content")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)
