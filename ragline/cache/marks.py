"""In-band marks: how a change says "re-verify before serving" (DESIGN.md §3.1).

A change does not re-run retrieval for every cached entry it may affect: it *marks* them, and an
entry is re-verified when it is next requested (its retrieval re-run from the stored query vector,
served if its evidence is unchanged). The mark lives in the stored value itself, as a 12-byte
header: 4 magic bytes, then an 8-byte token naming the change that marked it. Keeping it in-band
rather than in a side table means

* the exact-hit path pays one ``startswith`` and no lookup: whatever tier a value comes from
  (L1, L2 written by another instance, L3 after a restart) carries its own state;
* marking is atomic per value in every tier (a Lua script on Redis, one SQLite transaction on disk,
  a plain in-process update in memory), so a concurrent write of a fresh value is marked or not,
  never half of each;
* clearing a mark is a compare-and-set against the exact marked bytes that were verified: a later
  change re-marks with a new token, so a verification that raced it cannot clear its mark.

Only answer and retrieval entries are marked; embeddings and LLM responses are never stale.

**Stamps** (with a term clock, :mod:`ragline.cache.clock`): an answer or retrieval value is stored
behind a second 12-byte header, 4 magic bytes and the tenant's clock reading (8 bytes, big-endian)
when it was computed or last verified. A change that touches keyword terms only advances the clock
(O(terms of the change)); a read whose stamp is older than the clock checks the entry's own terms
against it. A marked value keeps its stamp behind the mark: ``MARK token STAMP seq payload``.
"""

from __future__ import annotations

import secrets
from typing import Final

__all__ = [
    "MARK",
    "MARK_LEN",
    "STAMP",
    "STAMP_LEN",
    "is_marked",
    "mark",
    "new_token",
    "payload",
    "stamp_of",
    "stamped",
    "token_of",
    "unmarked",
]

MARK: Final = b"\x00rlm"
"""Can never start a real value: answers and retrievals are JSON objects (``{``)."""
TOKEN_LEN: Final = 8
MARK_LEN: Final = len(MARK) + TOKEN_LEN
STAMP: Final = b"\x00rls"
STAMP_LEN: Final = len(STAMP) + 8


def new_token() -> bytes:
    """A fresh token for one change (random, so a counter reset can never collide)."""
    return secrets.token_bytes(TOKEN_LEN)


def is_marked(value: bytes) -> bool:
    return value.startswith(MARK)


def token_of(value: bytes) -> bytes:
    """The token of a marked value (call only when :func:`is_marked`)."""
    return value[len(MARK) : MARK_LEN]


def unmarked(value: bytes) -> bytes:
    """The value without its mark header (the value itself if it has none)."""
    return value[MARK_LEN:] if value.startswith(MARK) else value


def mark(value: bytes, token: bytes) -> bytes:
    """``value`` marked with ``token`` (an older mark is replaced)."""
    return MARK + token + unmarked(value)


def stamped(value: bytes, seq: int) -> bytes:
    """``value``'s payload stamped with clock reading ``seq`` (any mark and older stamp removed)."""
    return STAMP + seq.to_bytes(8, "big") + payload(value)


def stamp_of(value: bytes) -> int | None:
    """The clock reading a value was stamped with (under any mark), or None if it has no stamp."""
    v = value[MARK_LEN:] if value.startswith(MARK) else value
    return int.from_bytes(v[len(STAMP) : STAMP_LEN], "big") if v.startswith(STAMP) else None


def payload(value: bytes) -> bytes:
    """The value as served: without its mark and stamp headers."""
    v = value[MARK_LEN:] if value.startswith(MARK) else value
    return v[STAMP_LEN:] if v.startswith(STAMP) else v
