"""Encryption at rest of what the cache keeps outside the process: L2 (Redis) and L3 (disk).

Off by default; on with ``cache.encryption_key`` (32 random bytes, URL-safe base64, e.g.
``python -c "import os,base64;print(base64.urlsafe_b64encode(os.urandom(32)).decode())"``).
L1 stays plaintext: it is this process's own memory, like everything else the request handles.

**What is sealed.** Every value the L2 and L3 tiers store (answers, retrieval results, LLM
responses, embeddings: one code path, :class:`~ragline.cache.redis.RedisTier` and
:class:`~ragline.cache.disk.DiskTier` seal on write and open on read), and every dependency record
(they hold the query text and its vector) in Redis and in the SQLite index beside L3.  The
dependency index's keyword *terms* (analysed words of cached queries, used as lookup names) are
replaced by keyed hashes (:meth:`ValueCipher.term_names`), so they are not readable either.

**What stays clear, and why.** Cache keys (blake2b digests; tenant names are in them, as in
``/v1/cache/stats``), chunk ids in the dependency sets (ids, never text), the expiry envelope of an
L2 value, and the two 12-byte headers of :mod:`ragline.cache.marks`: the *mark* (a random token of
the change that marked the entry) and the *stamp* (a term-clock reading).  They carry no user text,
and they must stay readable where nothing can decrypt: the Redis tier marks entries in place with a
Lua script (it prepends a mark after the envelope) and clears marks by comparing stored bytes, and
the L3 tier keeps marks in a side table. So a sealed value is
``[MARK token] [STAMP seq] SEALED key_id nonce ciphertext+tag``, and only the payload is encrypted.

**Construction.** AES-256-GCM (``cryptography``'s AESGCM) with subkeys derived by HKDF-SHA256 from
the configured key. The associated data is the cache key (plus the stamp header): a value copied
under another key, or given another stamp, does not open. The 96-bit nonce is synthetic:
HMAC-SHA256 of associated data and plaintext under its own subkey (an SIV-style deterministic AEAD).
Deterministic sealing is what lets the Redis compare-and-set (clearing a mark after verification,
a Lua script that cannot decrypt) compare against the exact stored bytes: sealing the plaintext it
verified again gives them. It reveals only that a key holds the same value it held before; a nonce
repeats only for the same (key, stamp, plaintext), which then gives the same ciphertext. The mark
is not authenticated (the Lua script adds it): removing one is no more than replaying the value
an attacker with write access to Redis could have saved before the change, which no stateless
cache encryption prevents.

**Failure.** A value that does not open (a key that was rotated out, a tampered or truncated value,
a plaintext value while encryption is on, a sealed one while it is off) is a cache miss, counted
(``undecryptable`` in the tier's stats, ``ragline_cache_undecryptable_total``), never an error.

**Rotation.** Writes always use ``encryption_key``; reads accept it and every key in
``encryption_previous_keys`` (a 4-byte key id, derived from the key, picks it: no trial
decryption). Procedure: put the new key in ``encryption_key`` and the old one in
``encryption_previous_keys`` on every instance; entries age out within ``cache.ttl_s`` (or clear the
cache); then drop the old key. Entries still sealed with a dropped key are misses.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ragline.cache.marks import MARK, MARK_LEN, STAMP, STAMP_LEN
from ragline.config import decode_encryption_key

if TYPE_CHECKING:
    from ragline.config import CacheSettings

__all__ = ["SEALED", "ValueCipher", "cipher_from", "is_sealed"]

SEALED: Final = b"\x00rle"
"""Starts the sealed part; like the mark and stamp magics it can never start a JSON value."""
_KID_LEN: Final = 4
_NONCE_LEN: Final = 12
_TAG_LEN: Final = 16
_HEAD: Final = len(SEALED) + _KID_LEN + _NONCE_LEN
_AAD_PREFIX: Final = b"ragline-cache-v1\x00"


def _split(value: bytes) -> tuple[bytes, bytes, bytes]:
    """``(mark header, stamp header, rest)``; each header is ``b""`` when absent."""
    mark = value[:MARK_LEN] if value.startswith(MARK) else b""
    rest = value[len(mark) :]
    stamp = rest[:STAMP_LEN] if rest.startswith(STAMP) else b""
    return mark, stamp, rest[len(stamp) :]


def is_sealed(value: bytes) -> bool:
    """Does ``value`` (as a tier stores it, headers included) hold a sealed payload?"""
    return _split(value)[2].startswith(SEALED)


class _Key:
    __slots__ = ("aead", "kid", "nonce_key", "term_key")

    def __init__(self, raw: bytes) -> None:
        okm = HKDF(algorithm=hashes.SHA256(), length=100, salt=None, info=b"ragline cache at rest v1").derive(raw)
        self.aead = AESGCM(okm[:32])
        self.nonce_key = okm[32:64]
        self.term_key = okm[64:96]
        self.kid = okm[96:100]


class ValueCipher:
    """Seals and opens cache values for one set of keys (the first writes, all of them read).

    Stateless apart from counters, so one instance may be shared by tiers and threads."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("at least one key")
        self._keys = [_Key(k) for k in keys]
        self._current = self._keys[0]
        self._by_kid = {}
        for k in reversed(self._keys):  # the current key wins an (astronomically unlikely) id clash
            self._by_kid[k.kid] = k
        self.sealed = 0
        self.rejected = 0
        """Values that did not open (counted here for every user; the tiers count their own too)."""

    @staticmethod
    def _aad(name: str, stamp: bytes) -> bytes:
        return _AAD_PREFIX + name.encode("utf-8", "surrogatepass") + b"\x00" + stamp

    def _seal_with(self, k: _Key, name: str, value: bytes) -> bytes:
        mark, stamp, body = _split(value)
        aad = self._aad(name, stamp)
        nonce = hmac.digest(k.nonce_key, len(aad).to_bytes(4, "big") + aad + body, "sha256")[:_NONCE_LEN]
        return mark + stamp + SEALED + k.kid + nonce + k.aead.encrypt(nonce, body, aad)

    def seal(self, name: str, value: bytes) -> bytes:
        """``value`` with its payload encrypted under the current key, bound to ``name`` (the cache
        key, or another name unique to what is stored). Mark and stamp headers stay in front, clear."""
        self.sealed += 1
        return self._seal_with(self._current, name, value)

    def seal_all(self, name: str, value: bytes) -> list[bytes]:
        """``value`` sealed under every key, current first: what a stored copy of it may be (the
        candidates of a compare-and-set while a rotation is under way)."""
        return [self._seal_with(k, name, value) for k in self._keys]

    def open(self, name: str, value: bytes) -> bytes | None:
        """The plaintext value (headers kept), or None if it does not open (counted)."""
        mark, stamp, body = _split(value)
        if len(body) >= _HEAD + _TAG_LEN and body.startswith(SEALED):
            k = self._by_kid.get(body[4:8])
            if k is not None:
                try:
                    return mark + stamp + k.aead.decrypt(body[8:_HEAD], body[_HEAD:], self._aad(name, stamp))
                except InvalidTag:
                    pass
        self.rejected += 1
        return None

    def term_names(self, tenant: str, term: str) -> list[str]:
        """Keyed hashes standing for ``term`` in the dependency index, one per key (current first):
        writes use the first, lookups and removals all of them (records of a previous key)."""
        msg = tenant.encode() + b"\x00" + term.encode("utf-8", "surrogatepass")
        return ["~" + hmac.digest(k.term_key, msg, "sha256")[:12].hex() for k in self._keys]


def cipher_from(settings: CacheSettings) -> ValueCipher | None:
    """The cipher the settings configure (None: encryption at rest is off)."""
    if settings.encryption_key is None:
        return None
    keys = [settings.encryption_key, *settings.encryption_previous_keys]
    return ValueCipher([decode_encryption_key(k.get_secret_value()) for k in keys])
