"""Encryption at rest of cache values (ragline/cache/crypto.py): the codec, the disk tier and the SQLite
dependency index with a cipher, and the settings that configure it. The Redis side, and the pipeline
end to end, are in tests/integration/test_cache_encryption.py."""

from __future__ import annotations

import base64
import os
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from ragline.cache.crypto import SEALED, ValueCipher, cipher_from, is_sealed
from ragline.cache.deps import DepsIndex, load_record, record_bytes
from ragline.cache.deps_sqlite import DependencyIndex
from ragline.cache.disk import DiskTier
from ragline.cache.marks import MARK, STAMP, mark, new_token, payload, stamp_of, stamped, unmarked
from ragline.config import CacheSettings, Settings
from ragline.errors import ConfigError
from tests.unit.test_deps import CONTRACT, later, rec

KEY = "rl:v1:t1:answer:" + "0" * 32
BODY = b'{"answer":"The Eiffel Tower was completed in 1889.","sources":[]}'


def new_key() -> bytes:
    return os.urandom(32)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


@pytest.fixture
def cipher() -> ValueCipher:
    return ValueCipher([new_key()])


# ------------------------------------------------------------------ the codec


@pytest.mark.parametrize(
    "value",
    [BODY, stamped(BODY, 7), mark(stamped(BODY, 7), b"T" * 8), mark(BODY, b"T" * 8), b"", b"\x00\x01raw vector"],
    ids=["plain", "stamped", "marked+stamped", "marked", "empty", "binary"],
)
def test_round_trip_keeps_headers_clear_and_hides_the_payload(cipher: ValueCipher, value: bytes) -> None:
    sealed = cipher.seal(KEY, value)
    assert is_sealed(sealed) and not is_sealed(value)
    assert cipher.open(KEY, sealed) == value
    if value:
        assert value[-10:] not in sealed
    # what the Lua scripts and the invalidation logic read of a stored value still works on it
    assert stamp_of(sealed) == stamp_of(value)
    assert sealed.startswith(MARK) == value.startswith(MARK)
    assert SEALED in payload(sealed)[:4]


def test_a_mark_added_in_place_survives_opening(cipher: ValueCipher) -> None:
    """What RedisTier's Lua mark script does: prepend a mark to the stored (sealed) bytes."""
    stored = cipher.seal(KEY, stamped(BODY, 3))
    token = new_token()
    opened = cipher.open(KEY, mark(stored, token))
    assert opened == mark(stamped(BODY, 3), token)
    assert cipher.open(KEY, mark(mark(stored, token), new_token())) is not None  # re-marked


def test_sealing_is_deterministic_per_key_and_value(cipher: ValueCipher) -> None:
    a = cipher.seal(KEY, BODY)
    assert cipher.seal(KEY, BODY) == a  # what a compare-and-set in Lua relies on
    assert cipher.seal(KEY.replace("0", "1"), BODY) != a  # another cache key: another nonce
    assert cipher.seal(KEY, BODY + b" ") != a


def test_a_value_under_another_key_or_stamp_does_not_open(cipher: ValueCipher) -> None:
    sealed = cipher.seal(KEY, stamped(BODY, 5))
    assert cipher.open(KEY.replace("0", "1"), sealed) is None  # copied under another cache key
    forged = STAMP + (6).to_bytes(8, "big") + payload(sealed)  # the stamp is bound too
    assert cipher.open(KEY, forged) is None
    assert cipher.rejected == 2


def test_tampered_truncated_and_plaintext_values_are_rejected(cipher: ValueCipher) -> None:
    sealed = bytearray(cipher.seal(KEY, BODY))
    for i in (len(SEALED) + 4, len(sealed) // 2, len(sealed) - 1):  # nonce, ciphertext, tag
        bad = bytearray(sealed)
        bad[i] ^= 1
        assert cipher.open(KEY, bytes(bad)) is None
    assert cipher.open(KEY, bytes(sealed[:-1])) is None
    assert cipher.open(KEY, bytes(sealed[:20])) is None
    assert cipher.open(KEY, BODY) is None  # plaintext while encryption is on
    assert cipher.open(KEY, b"") is None
    assert cipher.rejected == 7


def test_rotation_reads_previous_keys_and_writes_the_current_one() -> None:
    a, b = new_key(), new_key()
    old, rotating, new_only = ValueCipher([a]), ValueCipher([b, a]), ValueCipher([b])
    sealed_a = old.seal(KEY, BODY)
    assert rotating.open(KEY, sealed_a) == BODY
    assert new_only.open(KEY, sealed_a) is None  # the old key was dropped: a miss
    assert old.open(KEY, rotating.seal(KEY, BODY)) is None  # writes use the new key
    assert rotating.seal_all(KEY, BODY) == [new_only.seal(KEY, BODY), sealed_a]


def test_term_names_are_keyed_per_tenant_and_listed_per_key() -> None:
    a, b = new_key(), new_key()
    names = ValueCipher([a]).term_names("t1", "eiffel")
    assert names == ValueCipher([a]).term_names("t1", "eiffel") and "eiffel" not in names[0]
    assert names != ValueCipher([a]).term_names("t2", "eiffel")
    assert ValueCipher([b, a]).term_names("t1", "eiffel")[1] == names[0]


def test_records_are_sealed_and_bound_to_their_entry(cipher: ValueCipher) -> None:
    r = rec("a")
    data = record_bytes(r, cipher)
    assert b"query a" not in data
    back = load_record(r.entry_key, "t1", data, cipher)
    assert back is not None and back.query == "query a" and back.terms == r.terms
    assert load_record(rec("b").entry_key, "t1", data, cipher) is None  # under another entry key
    assert load_record(r.entry_key, "t1", data, None) is None  # encryption turned off: unreadable
    assert load_record(r.entry_key, "t1", r.to_bytes(), cipher) is None  # plaintext while on
    assert load_record(r.entry_key, "t1", r.to_bytes(), None) is not None


# ------------------------------------------------------------------ settings


def test_settings_accept_a_key_and_reject_bad_ones_without_echoing_them() -> None:
    good = b64(new_key())
    cs = Settings.load(cache={"encryption_key": good, "encryption_previous_keys": [b64(new_key())]}).cache
    c = cipher_from(cs)
    assert c is not None and c.open(KEY, c.seal(KEY, BODY)) == BODY
    assert good not in repr(cs) and good not in str(Settings.load(cache={"encryption_key": good}).model_dump())
    assert cipher_from(CacheSettings()) is None  # off by default
    std = base64.b64encode(new_key()).decode().rstrip("=")  # standard alphabet, no padding: fine too
    assert cipher_from(Settings.load(cache={"encryption_key": std}).cache) is not None
    for bad in ("not a key", good[:-4], b64(os.urandom(16)), b64(os.urandom(33)), good[:-2] + "!!"):
        with pytest.raises(ConfigError) as err:
            Settings.load(cache={"encryption_key": bad})
        assert bad not in str(err.value) and "urlsafe_b64encode" in str(err.value)
    with pytest.raises(ConfigError, match="encryption_previous_keys"):
        Settings.load(cache={"encryption_previous_keys": ["short"], "encryption_key": good})
    with pytest.raises(ConfigError, match=r"needs cache\.encryption_key"):
        Settings.load(cache={"encryption_previous_keys": [good]})


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    current, previous = b64(new_key()), b64(new_key())
    monkeypatch.setenv("RAGLINE_CACHE__ENCRYPTION_KEY", current)
    monkeypatch.setenv("RAGLINE_CACHE__ENCRYPTION_PREVIOUS_KEYS", f'["{previous}"]')
    cs = Settings.load().cache
    assert cs.encryption_key is not None and cs.encryption_key.get_secret_value() == current
    assert [k.get_secret_value() for k in cs.encryption_previous_keys] == [previous]


# ------------------------------------------------------------------ the disk tier


def raw_files(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


async def test_disk_tier_seals_values_and_keeps_marks_and_replace_working(tmp_path: Path) -> None:
    c = ValueCipher([new_key()])
    tier = DiskTier(tmp_path / "l3", 1 << 24, cipher=c)
    try:
        value = stamped(BODY, 4)
        await tier.set_many({KEY: value}, 60)
        assert await tier.get_many([KEY]) == {KEY: value}
        token = new_token()
        await tier.mark_many([KEY], token)
        marked = (await tier.get_many([KEY]))[KEY]
        assert marked == mark(value, token)
        assert await tier.replace(KEY, marked, stamped(unmarked(marked), 9))  # verified: unmark, restamp
        assert (await tier.get_many([KEY]))[KEY] == stamped(BODY, 9)
        assert not await tier.replace(KEY, marked, value)  # the mark is gone: compare-and-set fails
        assert await tier.replace(KEY, stamped(BODY, 9), stamped(BODY, 10))
        assert await tier.get_many([KEY]) == {KEY: stamped(BODY, 10)}
        tier._cache.close()
        assert b"Eiffel" not in raw_files(tmp_path / "l3")
    finally:
        await tier.close()


async def test_disk_tier_values_that_do_not_open_are_counted_misses(tmp_path: Path) -> None:
    a, b = new_key(), new_key()
    writer = DiskTier(tmp_path / "l3", 1 << 24, cipher=ValueCipher([a]))
    await writer.set_many({KEY: BODY}, 60)
    await writer.close()
    for cipher, found in ((ValueCipher([b]), False), (None, False), (ValueCipher([b, a]), True)):
        tier = DiskTier(tmp_path / "l3", 1 << 24, cipher=cipher)
        try:
            assert (await tier.get_many([KEY]) == {KEY: BODY}) is found
            assert tier.stats()["undecryptable"] == (0 if found else 1)
        finally:
            await tier.close()
    tier = DiskTier(tmp_path / "l3", 1 << 24, cipher=ValueCipher([a]))
    try:  # tampering with the stored bytes
        stored = bytearray(tier._cache.get(KEY))
        stored[-1] ^= 1
        tier._cache.set(KEY, bytes(stored))
        assert await tier.get_many([KEY]) == {} and tier.undecryptable == 1
        await tier.set_many({KEY: BODY}, 60)  # a plaintext tier's values are misses with a cipher
        plain = DiskTier(tmp_path / "other", 1 << 24)
        await plain.set_many({KEY: BODY}, 60)
        await plain.close()
        other = DiskTier(tmp_path / "other", 1 << 24, cipher=ValueCipher([a]))
        assert await other.get_many([KEY]) == {} and other.undecryptable == 1
        await other.close()
    finally:
        await tier.close()


# ------------------------------------------------------------------ the SQLite dependency index


@pytest.mark.parametrize("check", CONTRACT, ids=lambda f: f.__name__)
async def test_sqlite_contract_with_encryption(check: Callable[[DepsIndex], Awaitable[None]], tmp_path: Path) -> None:
    idx = DependencyIndex(tmp_path / "deps.sqlite3", ValueCipher([new_key()]))
    try:
        await check(idx)
    finally:
        await idx.close()


async def test_sqlite_index_holds_no_query_text_or_terms_and_rotates(tmp_path: Path) -> None:
    a, b = new_key(), new_key()
    path = tmp_path / "deps.sqlite3"
    idx = DependencyIndex(path, ValueCipher([a]))
    r = rec("secretive", terms=("zanzibar",))
    await idx.add(r, later())
    await idx.close()
    db = sqlite3.connect(path)
    dump = "\n".join(db.iterdump()).encode()
    db.close()
    assert b"zanzibar" not in dump and b"query secretive" not in dump and b"query secretive" not in raw_files(tmp_path)
    rotating = DependencyIndex(path, ValueCipher([b, a]))
    try:  # during a rotation, what the previous key wrote is still found
        assert await rotating.by_terms("t1", ["zanzibar"]) == {r.entry_key}
        assert [x.query for x in await rotating.records("t1", [r.entry_key])] == ["query secretive"]
    finally:
        await rotating.close()
    dropped = DependencyIndex(path, ValueCipher([b]))
    try:  # the old key is gone: its records are unreadable (their entries do not open either)
        assert await dropped.records("t1", [r.entry_key]) == []
        assert await dropped.by_chunks("t1", ["c1"]) == {r.entry_key}  # chunk ids are clear: still dropped
    finally:
        await dropped.close()
