"""The canonical form of a query: what cannot change an answer is absorbed before anything else runs.

Two functions, both pure and fast (a few regex passes, no model):

* :func:`query_form` — the text the pipeline works with (embedding, retrieval, prompt, the semantic
  index): Unicode NFC, whitespace collapsed, a leading polite request ("please tell me about",
  "can you tell me", "I'd like to know", "hi,") and a trailing "please" / "thanks" removed, trailing
  sentence punctuation (``?``, ``.``, ``!``, ``…``) removed.  Case is kept (the LLM sees it; the
  embedder and BM25 are uncased, so case never changes what is retrieved).
* :func:`canonical` — ``query_form(text).casefold()``: the material of the exact answer key.

So "What is RAG?", "what is rag", "  What is  RAG. " and "Please tell me about what is RAG?" share one
key *and* one retrieval, which is what makes serving one's answer to the other exact (the fresh run of
either would use the same evidence).

Deliberately *not* absorbed, because each can change an answer: negations ("not", "n't", "never"),
numbers and units, quoted text and code, inner punctuation ("C++", "3.14", "U.S."), question words
("why" vs "how"), a second question ("What is X? How is it treated?" keeps its inner ``?``), NFKC
compatibility folding (``x²`` is not ``x2``), stemming and stop-word removal.  A filler prefix is only
removed when it is the whole opening of the query and something follows it; "please don't tell me
about X" keeps its "don't".
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final

__all__ = ["canonical", "query_form"]

_WS_RE: Final = re.compile(r"\s+")
# Openings that only ask politely; applied repeatedly ("Hi, could you please tell me about X").
_LEADING_RE: Final = re.compile(
    r"""^(?:
        (?:hi|hello|hey)(?:\s+there)?\s*[,!.]\s*
      | (?:please|kindly)\s*,?\s+
      | (?:can|could|would|will)\s+you\s+(?:please\s+|kindly\s+)?(?:tell|explain\s+to|show)\s+me
            (?:\s+about)?\s*[,:]?\s+
      | (?:please\s+)?(?:tell|explain\s+to)\s+me(?:\s+about)?\s*[,:]?\s+
      | i(?:'d|’d|\s+would)\s+like\s+to\s+know(?:\s+about)?\s*[,:]?\s+
      | i\s+want\s+to\s+know(?:\s+about)?\s*[,:]?\s+
    )""",
    re.IGNORECASE | re.VERBOSE,
)
_TRAILING_FILLER_RE: Final = re.compile(
    r"[\s,;:]+(?:please|thanks|thank\s+you(?:\s+very\s+much)?|thx|ty)$", re.IGNORECASE
)
_TRAILING_PUNCT_RE: Final = re.compile(r"[\s?!.…？！。]+$")
_MAX_PREFIXES: Final = 4
_NOT_A_QUESTION: Final = frozenset({"about", "me", "you", "please"})
"""What may follow a filler without being a question of its own ("Tell me about")."""


def query_form(text: str) -> str:
    """The normalised query the pipeline embeds, retrieves with and prompts with (case kept).

    Idempotent: ``query_form(query_form(t)) == query_form(t)``.  Never empty for a non-blank input:
    a query made only of filler or punctuation keeps its whitespace-normalised text.
    """
    base = _WS_RE.sub(" ", unicodedata.normalize("NFC", text)).strip()
    out = _TRAILING_PUNCT_RE.sub("", base)
    for _ in range(_MAX_PREFIXES):
        m = _LEADING_RE.match(out)
        if m is None or m.end() >= len(out) or out[m.end() :].lower() in _NOT_A_QUESTION:
            break
        out = out[m.end() :]
    for _ in range(2):  # "..., please?" and "... thanks!"
        stripped = _TRAILING_PUNCT_RE.sub("", _TRAILING_FILLER_RE.sub("", out))
        if not stripped or stripped == out:
            break
        out = stripped
    return out or base


def canonical(text: str) -> str:
    """The exact-key material of a query: :func:`query_form`, case-folded."""
    return query_form(text).casefold()
