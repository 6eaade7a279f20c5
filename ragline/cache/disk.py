"""L3: the local disk tier on ``diskcache`` (SQLite + files), bounded in bytes (DESIGN.md §2–3).

diskcache is thread- and process-safe, so several uvicorn workers may share
one L3 directory; this tier hands its SQLite work to worker threads (small
reads may run inline, see :class:`DiskTier`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import diskcache

from ragline.cache.crypto import ValueCipher, is_sealed
from ragline.cache.disk_marks import DiskMarks
from ragline.cache.keys import KEY_ROOT
from ragline.cache.marks import is_marked, mark, token_of, unmarked
from ragline.cache.tier import MISS, Miss, PendingDeletes

T = TypeVar("T")

__all__ = ["DiskTier"]


class DiskTier:
    """Local L3 on ``diskcache`` (SQLite + files), bounded in bytes on disk.

    * ``size_limit=max_bytes`` with diskcache's culling; the eviction policy is
      *least-recently-stored*: LRU would turn every read into a write
      transaction (measured slower and contended across processes).
    * TTL through diskcache's ``expire``; expired rows are never returned.
    * ``timeout_s`` is SQLite's busy timeout: a locked database is a miss /
      dropped write, never a stall.
    * Reads run synchronously when ``sync_reads`` (a small-value read is a
      single indexed SELECT: measured 8 µs median vs 69 µs through
      ``asyncio.to_thread``); writes (~170 µs, p99 in ms when SQLite
      checkpoints), deletes and clears always run in a worker thread.
    * A delete that fails is owed (reads of the key miss) and retried after
      the next successful call, like :class:`RedisTier`.
    * With a ``cipher`` (encryption at rest, :mod:`ragline.cache.crypto`) values are sealed before
      they reach diskcache and opened after; marks stay in their side table (tokens, no text). A
      value that does not open is a miss, counted as ``undecryptable``.
    """

    shared = False

    def __init__(
        self,
        directory: str | Path,
        max_bytes: int,
        *,
        name: str = "l3",
        timeout_s: float = 0.25,
        sync_reads: bool = True,
        cipher: ValueCipher | None = None,
    ) -> None:
        self.name = name
        self.cipher = cipher
        self.undecryptable = 0
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.sync_reads = sync_reads
        # SQLite's WAL lives beside the database and is not counted by diskcache's
        # size_limit; keep it to ~1/32 of the bound (4 MiB at most, SQLite's default)
        # so the whole directory stays within the bound.
        wal_pages = max(16, min(1000, max_bytes // 4096 // 32))
        self._cache: diskcache.Cache = diskcache.Cache(
            str(self.directory),
            size_limit=max_bytes,
            timeout=timeout_s,
            eviction_policy="least-recently-stored",
            statistics=False,
            tag_index=False,
            sqlite_wal_autocheckpoint=wal_pages,
            sqlite_journal_size_limit=wal_pages * 4096,
        )
        self._marks = DiskMarks(self.directory / "marks.sqlite3", timeout_s)
        self.errors = 0
        self._consecutive_errors = 0
        self.last_error: str | None = None
        self._pending = PendingDeletes(100_000)
        self._replay_task: asyncio.Task[None] | None = None

    @property
    def healthy(self) -> bool:
        return self._consecutive_errors < 3

    @property
    def pending_deletes(self) -> int:
        """Deletes owed after a failure (-1: a full clear is owed); reads of them miss."""
        return self._pending.size()

    def _fail(self, exc: BaseException) -> None:
        self.errors += 1
        self._consecutive_errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"

    def _get_sync(self, keys: Sequence[str]) -> dict[str, tuple[bytes, float | None]]:
        cache = self._cache
        now = time.time()
        out: dict[str, tuple[bytes, float | None]] = {}
        for k in keys:
            value, expire_at = cache.get(k, default=None, expire_time=True)
            if isinstance(value, bytes) and (value := self._open(k, value)) is not None:
                out[k] = (value, None if expire_at is None else expire_at - now)
        if out:  # a marked entry is handed out with its mark, as the other tiers store it
            for k, token in self._marks.tokens(out).items():
                out[k] = (mark(out[k][0], token), out[k][1])
        return out

    def _open(self, key: str, stored: bytes) -> bytes | None:
        """The plaintext of a stored value; None (a miss, counted) if it does not open, or if it is
        sealed and there is no cipher (written while encryption was on)."""
        cipher = self.cipher
        value = stored if cipher is None else cipher.open(key, stored)
        if value is None or (cipher is None and is_sealed(stored)):
            self.undecryptable += 1
            return None
        return value

    def _matches(self, key: str, stored: object, expected: bytes) -> bool:
        """Does the stored value hold exactly ``expected`` (plaintext, no mark)?"""
        if self.cipher is None:
            return stored == expected
        return isinstance(stored, bytes) and self.cipher.open(key, stored) == expected

    async def _call(self, fn: Callable[[], T], in_thread: bool = True) -> T | Miss:
        try:
            res = await asyncio.to_thread(fn) if in_thread else fn()
        except Exception as exc:  # diskcache.Timeout, sqlite3.Error, OSError
            self._fail(exc)
            return MISS
        self._consecutive_errors = 0
        if self._pending and (self._replay_task is None or self._replay_task.done()):
            self._replay_task = asyncio.create_task(self._replay(), name=f"ragline-{self.name}-replay")
        return res

    async def _replay(self) -> None:
        """Apply deletes that failed earlier (the disk answers again)."""
        pending = self._pending
        clear_all, prefixes, keys = pending.all, list(pending.prefixes), list(pending.keys)
        cache = self._cache

        def op() -> None:
            if clear_all:
                cache.clear()
                return
            if prefixes:
                for k in list(cache.iterkeys()):
                    if isinstance(k, str) and any(k.startswith(p) for p in prefixes):
                        cache.delete(k)
            for k in keys:
                cache.delete(k)

        try:
            await asyncio.to_thread(op)
        except Exception as exc:
            self._fail(exc)
            return
        if clear_all:
            pending.all = False
        pending.prefixes.difference_update(prefixes)
        pending.keys.difference_update(keys)

    async def get_many_ttl(self, keys: Sequence[str]) -> dict[str, tuple[bytes, float | None]]:
        if not keys:
            return {}
        res = await self._call(lambda: self._get_sync(keys), in_thread=not self.sync_reads)
        if isinstance(res, Miss):
            return {}
        return self._pending.filter(res) if self._pending else res

    async def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        return {k: v for k, (v, _) in (await self.get_many_ttl(keys)).items()}

    async def set_many(self, items: Mapping[str, bytes], ttl: float) -> None:
        if not items or ttl <= 0:
            return
        cache = self._cache
        pairs = list(items.items())
        if self.cipher is not None:
            seal = self.cipher.seal
            pairs = [(k, seal(k, v)) for k, v in pairs]

        def op() -> None:
            for k, v in pairs:
                cache.set(k, v, expire=ttl)
            self._marks.remove(k for k, _ in pairs)  # a fresh value (a change meanwhile drops it again)

        await self._call(op)

    async def delete_many(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        cache = self._cache
        batch = list(keys)

        def op() -> None:
            for k in batch:
                cache.delete(k)
            self._marks.remove(batch)

        if isinstance(await self._call(op), Miss):
            self._pending.add(batch)

    async def mark_many(self, keys: Sequence[str], token: bytes) -> None:
        """One row per key in the side table (:mod:`ragline.cache.disk_marks`); values stay as they are."""
        if not keys:
            return
        batch = list(keys)
        if isinstance(await self._call(lambda: self._marks.add(batch, token)), Miss):
            await self.delete_many(batch)  # cannot mark: the copies must not be served unverified

    async def replace(self, key: str, expected: bytes, value: bytes) -> bool:
        cache = self._cache
        stored_value = value if self.cipher is None else self.cipher.seal(key, value)
        if is_marked(expected):
            # clearing a mark (and maybe restamping): the row must still hold the verified token and
            # the value the verified bytes
            base = unmarked(expected)

            def clear_mark() -> bool:
                with cache.transact():
                    current, expire_at = cache.get(key, default=None, expire_time=True)
                    if not self._matches(key, current, base) or not self._marks.take(key, token_of(expected)):
                        return False
                    if value != base:
                        left = None if expire_at is None else expire_at - time.time()
                        if left is not None and left <= 0:
                            return False
                        cache.set(key, stored_value, expire=left)
                    return True

            return await self._call(clear_mark) is True

        def op() -> bool:
            now = time.time()
            with cache.transact():
                current, expire_at = cache.get(key, default=None, expire_time=True)
                if not self._matches(key, current, expected):
                    return False
                left = None if expire_at is None else expire_at - now
                if left is not None and left <= 0:
                    return False
                cache.set(key, stored_value, expire=left)
                return True

        res = await self._call(op)
        return res is True

    async def clear(self, prefix: str | None = None) -> int:
        """Everything for None; otherwise a scan of all keys (O(entries), admin path)."""
        cache = self._cache

        def op() -> int:
            self._marks.clear(prefix)
            if prefix is None:
                return int(cache.clear())
            doomed = [k for k in cache.iterkeys() if isinstance(k, str) and k.startswith(prefix)]
            n = 0
            for k in doomed:
                n += bool(cache.delete(k))
            return n

        res = await self._call(op)
        if isinstance(res, Miss):
            self._pending.add(prefix=KEY_ROOT if prefix is None else prefix)
            return 0
        return res

    def volume(self) -> int:
        """diskcache's estimate of bytes on disk (SQLite pages + value files)."""
        return int(self._cache.volume())

    def stats(self) -> dict[str, float]:
        return {
            "healthy": 1 if self.healthy else 0,
            "errors": self.errors,
            "max_bytes": self.max_bytes,
            "pending_deletes": self.pending_deletes,
            "undecryptable": self.undecryptable,
        }

    async def close(self) -> None:
        task = self._replay_task
        if task is not None and not task.done():
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, 2.0)
        with contextlib.suppress(Exception):
            self._cache.close()
        with contextlib.suppress(Exception):
            self._marks.close()
