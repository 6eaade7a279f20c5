"""The embedded store's own record (SQLite table ``meta``): what its vectors are (``dim``) and which
embedder made them (``embedder``, checked by ``ragline.assembly.check_embedder``)."""

from __future__ import annotations

import sqlite3
import threading

__all__ = ["MetaRecord"]


class MetaRecord:
    """``meta``/``set_meta`` over a SQLite connection guarded by a lock (mixed into EmbeddedStore)."""

    _db: sqlite3.Connection
    _db_lock: threading.RLock

    def meta(self, key: str) -> str | None:
        """The value recorded under ``key``, or None."""
        with self._db_lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._db_lock:
            self._db.execute(
                "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (key, value),
            )
