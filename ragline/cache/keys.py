"""Cache keys: complete, versioned, partitioned by tenant (DESIGN.md §3.3–3.4).

Every cache entry in every tier is addressed by one string::

    rl:v{schema}:{tenant}:{kind}:{blake2b-128 hex of the canonical bytes}

* ``schema`` is bumped whenever the *meaning* of a cached value changes (its
  serialisation, or what the canonical material covers), so that an upgraded
  instance can never read an entry written by an older one.
* ``tenant`` is validated against a small safe charset: no ``:`` (it would
  make the key ambiguous and let one tenant's prefix cover another's) and no
  glob characters (``*?[]``), so a per-tenant ``SCAN MATCH`` prefix is exact.
* ``kind`` is one of :data:`KINDS`; it lets one tenant's answers be dropped
  without touching its embeddings, and labels the hit/miss metrics.
* the digest covers *everything else* that changes the value: the normalised
  query, the settings fingerprint (embedder, LLM model and output parameters,
  prompt version, retrieval parameters).  Callers build that material as a
  dict and pass it through :func:`canonical_bytes` (orjson, sorted keys), so
  two equal dicts always give the same key regardless of insertion order.

A key is computed once per request and then passed around as a string: the
hot path never hashes twice.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Final, Literal

import orjson

from ragline.canonical import canonical
from ragline.errors import InvalidInput

SCHEMA_VERSION: Final = 1
"""Bump when the serialised form or the canonical material of any kind changes."""

Kind = Literal["answer", "retrieval", "embedding", "llm", "semantic", "function"]
KINDS: Final[frozenset[str]] = frozenset({"answer", "retrieval", "embedding", "llm", "semantic", "function"})
"""``function``: results of users' ``@ragline.cached`` functions (:mod:`ragline.cache.functions`)."""

KEY_ROOT: Final = "rl:"
"""Every ragline key starts with this; ``clear(None)`` on a shared Redis only removes these."""

DIGEST_HEX_LEN: Final = 32
"""blake2b with digest_size=16 gives 32 hex characters."""

_TENANT_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


@lru_cache(maxsize=4096)
def validate_tenant(tenant: str) -> str:
    """Return ``tenant`` unchanged if it is a safe key component, else raise ``InvalidInput``.

    Allowed: 1–64 characters from ``A-Z a-z 0-9 _ . -``, starting with a letter or
    digit.  Cached (the set of tenants is small), so repeated validation on the
    request path is a dict lookup.
    """
    if not isinstance(tenant, str) or _TENANT_RE.fullmatch(tenant) is None:
        raise InvalidInput(
            f"invalid tenant {tenant!r}: use 1-64 characters from A-Z a-z 0-9 _ . - (starting with a letter or digit)"
        )
    return tenant


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown cache kind {kind!r}; expected one of {sorted(KINDS)}")


def digest(canonical: bytes | str) -> str:
    """The 128-bit blake2b hex digest used as the last key component."""
    data = canonical.encode() if isinstance(canonical, str) else canonical
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def make_key(tenant: str, kind: str, canonical: bytes | str, schema: int = SCHEMA_VERSION) -> str:
    """Build ``rl:v{schema}:{tenant}:{kind}:{blake2b(canonical)}``.

    ``canonical`` must already contain every input that changes the cached
    value (see the module docstring); use :func:`canonical_bytes` for dicts.
    Raises ``InvalidInput`` for a bad tenant and ``ValueError`` for an unknown
    kind (a programming error, not a user error).
    """
    validate_tenant(tenant)
    _check_kind(kind)
    return f"rl:v{schema}:{tenant}:{kind}:{digest(canonical)}"


def canonical_bytes(material: Mapping[str, Any]) -> bytes:
    """Deterministic bytes for a dict of key material (orjson, keys sorted recursively).

    Values must be JSON-serialisable by orjson (str, int, float, bool, None,
    lists, dicts, numpy arrays, dataclasses); floats are written in their
    shortest round-trip form, so ``0.1`` is always ``0.1``.
    """
    return orjson.dumps(material, option=orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY)


def make_key_for(tenant: str, kind: str, material: Mapping[str, Any], schema: int = SCHEMA_VERSION) -> str:
    """``make_key`` over ``canonical_bytes(material)``: the usual way to build a key."""
    return make_key(tenant, kind, canonical_bytes(material), schema)


def canonical_query(text: str) -> str:
    """Normalise a user query for the exact-match cache key: :func:`ragline.canonical.canonical`.

    NFC, whitespace collapsed, case folded, a polite opening ("please tell me about", "can you tell
    me", "I'd like to know") and trailing sentence punctuation and "please"/"thanks" removed: what
    cannot change an answer.  Negations, numbers, quoted text, inner punctuation and NFKC folding are
    kept (see :mod:`ragline.canonical` for why).  The schema version was not bumped when filler and
    trailing punctuation joined the rule: an older entry found through the new rule was written for a
    query of the same class ("what is x" for "what is x?"), whose answer is the same.
    """
    return canonical(text)


def tenant_prefix(tenant: str, schema: int = SCHEMA_VERSION) -> str:
    """Prefix of every key of ``tenant`` (all kinds): ``rl:v{schema}:{tenant}:``."""
    validate_tenant(tenant)
    return f"rl:v{schema}:{tenant}:"


def kind_prefix(tenant: str, kind: str, schema: int = SCHEMA_VERSION) -> str:
    """Prefix of every key of one kind of one tenant: ``rl:v{schema}:{tenant}:{kind}:``."""
    validate_tenant(tenant)
    _check_kind(kind)
    return f"rl:v{schema}:{tenant}:{kind}:"


def kind_of(key: str) -> str:
    """The kind component of a well-formed key (``"other"`` if it is not one).

    Used to label hit/miss counters; one ``rfind`` and one slice, no split.
    """
    end = len(key) - DIGEST_HEX_LEN - 1
    if end <= 0 or key[end] != ":":
        return "other"
    start = key.rfind(":", 0, end)
    return key[start + 1 : end] if start >= 0 else "other"


def parse_key(key: str) -> tuple[int, str, str, str]:
    """Split a key into ``(schema, tenant, kind, digest)``; ``ValueError`` if malformed."""
    parts = key.split(":")
    if (
        len(parts) != 5
        or parts[0] != "rl"
        or not parts[1].startswith("v")
        or not parts[1][1:].isdigit()
        or parts[3] not in KINDS
        or len(parts[4]) != DIGEST_HEX_LEN
    ):
        raise ValueError(f"not a ragline cache key: {key!r}")
    validate_tenant(parts[2])
    return int(parts[1][1:]), parts[2], parts[3], parts[4]
