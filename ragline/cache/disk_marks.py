"""Marks of L3 entries, in a side table beside the diskcache (DESIGN.md §3.1).

Why not in the value, as in L1 and L2: a diskcache write is a row rewrite (~170 µs, and a large value
is a file), so marking the 9,000 entries a change touched at 10k cached entries cost 1.0 s of a 1.6 s
ingest (measured). One ``INSERT`` per key in one transaction costs a few µs. Readers never see the
difference: :class:`~ragline.cache.disk.DiskTier` hands a marked value out with its mark header
(:func:`ragline.cache.marks.mark`), and clearing a mark is a delete of the row holding exactly the
token that was verified.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from ragline.cache.deps import batched

__all__ = ["DiskMarks"]


class DiskMarks:
    """``key → token`` of the marked entries of one L3 directory (thread-safe; shared by the
    processes of one data dir through SQLite)."""

    def __init__(self, path: Path, timeout_s: float) -> None:
        self._db = sqlite3.connect(path, timeout=timeout_s, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS marks (key TEXT PRIMARY KEY, token BLOB NOT NULL) WITHOUT ROWID")
        self._lock = threading.Lock()

    def add(self, keys: Sequence[str], token: bytes) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO marks VALUES (?, ?)", [(k, token) for k in keys])
            self._db.execute("COMMIT")

    def tokens(self, keys: Iterable[str]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        with self._lock:
            for batch in batched(list(keys), 500):
                q = f"SELECT key, token FROM marks WHERE key IN ({','.join('?' * len(batch))})"
                out.update((k, bytes(t)) for k, t in self._db.execute(q, batch))
        return out

    def remove(self, keys: Iterable[str]) -> None:
        with self._lock:
            for batch in batched(list(keys), 500):
                self._db.execute(f"DELETE FROM marks WHERE key IN ({','.join('?' * len(batch))})", batch)

    def take(self, key: str, token: bytes) -> bool:
        """Clear ``key``'s mark if it is still ``token`` (compare-and-delete)."""
        with self._lock:
            return self._db.execute("DELETE FROM marks WHERE key=? AND token=?", (key, token)).rowcount == 1

    def clear(self, prefix: str | None) -> None:
        with self._lock:
            if prefix is None:
                self._db.execute("DELETE FROM marks")
            else:  # keys are text: the prefix range [prefix, prefix + U+10FFFF)
                self._db.execute("DELETE FROM marks WHERE key >= ? AND key < ?", (prefix, prefix + "\U0010ffff"))

    def close(self) -> None:
        with self._lock:
            self._db.close()
