"""How every process serving one data dir stays in step with the embedded store (DESIGN.md §6).

SQLite holds the truth; each process holds derived state (usearch vectors, the tantivy reader, the
key → chunk-id map, and above the store its caches).  Three small parts keep the derived state exact:

* **The change log** (table ``changes`` in ``store.sqlite3``): one row per upsert or delete, written
  in the same transaction as the rows it describes, ``published`` once the writer's tantivy commit is
  done (a process that applied the row before that would search a keyword index without it).
* **The sequence file** (``changes.seq``): 8 bytes, memory-mapped, a count of publishes.  A reader
  compares it with the value it last synced at before every read, the exact-hit path included:
  0.23 µs against 1.8 µs for ``PRAGMA data_version`` (measured on the 2-core machine).  Every publish
  increments it under ``flock`` (read and write together), so no publish can go unseen.
* **A per-tenant writer lock** (``flock`` on ``tenants/<t>/.write.lock`` plus a thread lock): writers
  of one tenant take turns across processes, so their tantivy commits apply in log order; writers of
  different tenants never wait for each other (SQLite's own write lock is held only for the rows).

A writer that died between its transaction and ``published`` leaves a pending row.  The next writer
of that tenant (the dead writer's ``flock`` is gone) re-applies it to the keyword index and publishes
it; readers skip pending rows until then and never lose them (they remember them by seq).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import orjson

from ragline.types import Change

__all__ = ["CHANGES_SCHEMA", "ChangeLog", "LoggedChange", "SeqFile", "TenantLocks"]

CHANGES_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL, origin TEXT NOT NULL, published INTEGER NOT NULL, at REAL NOT NULL,
    removed_keys BLOB NOT NULL, added_keys BLOB NOT NULL,
    removed BLOB NOT NULL, added BLOB NOT NULL, terms BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_pending ON changes (tenant) WHERE published = 0;
"""

KEEP_S: Final = 7 * 24 * 3600.0
"""Published rows older than this are trimmed; a process that slept longer reloads everything."""


@dataclass(frozen=True, slots=True)
class LoggedChange:
    """One row of the log: the change as invalidation sees it, plus the index keys it moved."""

    change: Change
    origin: str
    published: bool
    removed_keys: tuple[int, ...]
    added_keys: tuple[int, ...]


class ChangeLog:
    """Rows of the ``changes`` table; every method runs on the caller's connection, under its lock."""

    @staticmethod
    def append(
        db: sqlite3.Connection,
        tenant: str,
        origin: str,
        removed_keys: list[int],
        added_keys: list[int],
        removed: list[str],
        added: list[str],
        terms: list[str],
    ) -> int:
        """A pending row, inside the caller's write transaction; returns its seq."""
        cur = db.execute(
            "INSERT INTO changes (tenant, origin, published, at, removed_keys, added_keys, removed, added, terms) "
            "VALUES (?,?,0,?,?,?,?,?,?)",
            (
                tenant,
                origin,
                time.time(),
                orjson.dumps(removed_keys),
                orjson.dumps(added_keys),
                orjson.dumps(removed),
                orjson.dumps(added),
                orjson.dumps(terms),
            ),
        )
        return int(cur.lastrowid or 0)

    @staticmethod
    def publish(db: sqlite3.Connection, seq: int) -> None:
        db.execute("UPDATE changes SET published = 1 WHERE seq = ?", (seq,))

    @staticmethod
    def pending(db: sqlite3.Connection, tenant: str) -> list[LoggedChange]:
        """Rows of ``tenant`` a writer committed but never published (it died)."""
        return _rows(db.execute(f"{_SELECT} WHERE tenant = ? AND published = 0 ORDER BY seq", (tenant,)))

    @staticmethod
    def since(db: sqlite3.Connection, seq: int, also: set[int]) -> list[LoggedChange]:
        """Rows after ``seq``, plus the rows ``also`` names (pending when last seen), in seq order."""
        rows = _rows(db.execute(f"{_SELECT} WHERE seq > ? ORDER BY seq", (seq,)))
        if also:
            marks = ",".join("?" * len(also))
            rows = _rows(db.execute(f"{_SELECT} WHERE seq IN ({marks})", sorted(also))) + rows
        return rows

    @staticmethod
    def recent(db: sqlite3.Connection, limit: int) -> list[Change]:
        """The last ``limit`` published rows' changes, oldest first."""
        rows = _rows(db.execute(f"{_SELECT} WHERE published = 1 ORDER BY seq DESC LIMIT ?", (limit,)))
        return [r.change for r in reversed(rows)]

    @staticmethod
    def tenants_of(db: sqlite3.Connection, seqs: list[int]) -> dict[int, str]:
        if not seqs:
            return {}
        marks = ",".join("?" * len(seqs))
        return {int(q): t for q, t in db.execute(f"SELECT seq, tenant FROM changes WHERE seq IN ({marks})", seqs)}

    @staticmethod
    def first_after(db: sqlite3.Connection, seq: int) -> int | None:
        """The smallest seq above ``seq`` still in the log (a gap: trimmed rows)."""
        row = db.execute("SELECT min(seq) FROM changes WHERE seq > ?", (seq,)).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    @staticmethod
    def last(db: sqlite3.Connection) -> int:
        row = db.execute("SELECT max(seq) FROM changes").fetchone()
        return 0 if row is None or row[0] is None else int(row[0])

    @staticmethod
    def trim(db: sqlite3.Connection, keep_s: float = KEEP_S) -> None:
        """Forget old published rows (in the caller's transaction); the newest row always stays, so
        the AUTOINCREMENT sequence never restarts."""
        db.execute(
            "DELETE FROM changes WHERE published = 1 AND at < ? AND seq < (SELECT max(seq) FROM changes)",
            (time.time() - keep_s,),
        )


_SELECT: Final = "SELECT seq, tenant, origin, published, removed_keys, added_keys, removed, added, terms FROM changes"


def _rows(cur: sqlite3.Cursor) -> list[LoggedChange]:
    out: list[LoggedChange] = []
    for seq, tenant, origin, published, rk, ak, removed, added, terms in cur:
        change = Change(
            int(seq), tenant, tuple(orjson.loads(removed)), tuple(orjson.loads(added)), tuple(orjson.loads(terms))
        )
        out.append(LoggedChange(change, origin, bool(published), tuple(orjson.loads(rk)), tuple(orjson.loads(ak))))
    return out


class SeqFile:
    """A count of publishes, in an 8-byte memory-mapped file every process of the data dir shares.

    Reading it is a slice of shared memory (no system call); counting takes an exclusive ``flock``."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size < 8:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    if os.fstat(fd).st_size < 8:
                        os.ftruncate(fd, 8)
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            self._mm = mmap.mmap(fd, 8)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._thread_lock = threading.Lock()

    def read(self) -> int:
        return int.from_bytes(self._mm[:8], "little")

    def bump(self) -> int:
        """Count one publish: read and write under the lock, so two processes publishing at once
        move it twice (a reader that synced between them must see it move again)."""
        with self._thread_lock:  # flock does not exclude threads sharing this descriptor
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                value = self.read() + 1
                self._mm[:8] = value.to_bytes(8, "little")
                return value
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self._mm.close()
        os.close(self._fd)


class TenantLocks:
    """One writer at a time per tenant: a thread lock within the process, ``flock`` across processes."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[Path, threading.Lock] = {}

    @contextmanager
    def hold(self, tenant_dir: Path) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(tenant_dir, threading.Lock())
        with lock:
            tenant_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(tenant_dir / ".write.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # released by close, and by the OS if this process dies
                yield
            finally:
                os.close(fd)
