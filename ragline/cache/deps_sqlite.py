"""The single-instance dependency index: SQLite next to the L3 cache (DESIGN.md §3.1).

:class:`DependencyIndex` implements :class:`~ragline.cache.deps.DepsIndex`; its
SQL runs in worker threads (``asyncio.to_thread``) on a thread-safe
:class:`SqliteDeps`, so the event loop never waits for SQLite.  The same file
serves as the local fallback of :class:`~ragline.cache.deps_redis.RedisDependencyIndex`.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from ragline.cache.deps import DenseRows, DepRecord, batched, load_record, record_bytes, term_names
from ragline.types import Vectors

if TYPE_CHECKING:
    from ragline.cache.crypto import ValueCipher

__all__ = ["DependencyIndex", "SqliteDeps"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    entry_key TEXT PRIMARY KEY, tenant TEXT NOT NULL, record BLOB NOT NULL, expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_tenant ON entries (tenant);
CREATE TABLE IF NOT EXISTS chunk_deps (tenant TEXT NOT NULL, chunk_id TEXT NOT NULL, entry_key TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS chunk_deps_idx ON chunk_deps (tenant, chunk_id);
CREATE INDEX IF NOT EXISTS chunk_deps_entry ON chunk_deps (entry_key);
CREATE TABLE IF NOT EXISTS term_deps (tenant TEXT NOT NULL, term TEXT NOT NULL, entry_key TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS term_deps_idx ON term_deps (tenant, term);
CREATE INDEX IF NOT EXISTS term_deps_entry ON term_deps (entry_key);
CREATE TABLE IF NOT EXISTS dense_log (
    ver INTEGER PRIMARY KEY AUTOINCREMENT, origin TEXT NOT NULL, tenant TEXT NOT NULL, entry_key TEXT NOT NULL
);
"""
_DENSE_LOG_KEEP: Final = 200_000
"""Rows of ``dense_log`` kept; a process further behind rebuilds its matrix from the records."""


class SqliteDeps:
    """The synchronous, thread-safe SQLite store behind :class:`DependencyIndex`.

    An in-memory matrix of query vectors per tenant serves the dense check of
    new chunks (one matrix product for a whole ingest batch).  With a ``cipher`` (encryption at
    rest, :mod:`ragline.cache.crypto`) records are sealed and terms stored as keyed hashes.
    """

    def __init__(self, path: Path, cipher: ValueCipher | None = None) -> None:
        self.cipher = cipher
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # every record writes a few hundred reverse-index rows: checkpoint (and fsync) the WAL every
        # ~80 MB instead of every 4 MB, and keep it at most 64 MB after one (measured: COMMIT 6.2 → 3.1 ms)
        self._db.execute("PRAGMA wal_autocheckpoint=20000")
        self._db.execute("PRAGMA journal_size_limit=67108864")
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()
        self._dense: dict[str, DenseRows] = {}
        # Other processes serving this data dir (workers, a CLI ingest) add and remove records too:
        # every add and remove appends (tenant, key) to dense_log, and before a dense check the
        # matrix applies the rows other processes appended since (their records re-read), so a
        # change finds every process's entries, not only this one's.
        self._origin = secrets.token_hex(8)
        self._data_version = self._version()
        self._writes = 0

    def add(self, rec: DepRecord, expires: float) -> bool:
        with self._lock:
            db = self._db
            db.execute("BEGIN")
            self._remove([rec.entry_key])
            data = record_bytes(rec, self.cipher)
            db.execute("INSERT INTO entries VALUES (?,?,?,?)", (rec.entry_key, rec.tenant, data, expires))
            db.executemany(
                "INSERT INTO chunk_deps VALUES (?,?,?)",
                [(rec.tenant, c, rec.entry_key) for c in set(rec.candidate_ids)],
            )
            db.executemany(
                "INSERT INTO term_deps VALUES (?,?,?)",
                [(rec.tenant, t, rec.entry_key) for t in set(term_names(self.cipher, rec.tenant, rec.terms))],
            )
            self._log([(rec.tenant, rec.entry_key)])
            db.execute("COMMIT")
            rows = self._dense.get(rec.tenant)
            if rows is not None:
                rows.upsert(rec)
        return True

    def _remove(self, keys: Sequence[str]) -> None:
        for batch in batched(list(keys), 500):
            marks = ",".join("?" * len(batch))
            for table in ("entries", "chunk_deps", "term_deps"):
                self._db.execute(f"DELETE FROM {table} WHERE entry_key IN ({marks})", batch)

    def remove(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        with self._lock:
            self._db.execute("BEGIN")
            owners = self._tenants_of(keys)
            self._remove(keys)
            self._log(owners)
            self._db.execute("COMMIT")
            for t in {t for t, _ in owners}:
                rows = self._dense.get(t)
                if rows is not None:
                    rows.remove(keys)

    def _tenants_of(self, keys: Sequence[str]) -> list[tuple[str, str]]:
        """(tenant, key) of the keys that have a record."""
        out: list[tuple[str, str]] = []
        for batch in batched(list(keys), 500):
            marks = ",".join("?" * len(batch))
            out.extend(
                (str(t), str(k))
                for t, k in self._db.execute(
                    f"SELECT tenant, entry_key FROM entries WHERE entry_key IN ({marks})", batch
                )
            )
        return out

    def _log(self, rows: list[tuple[str, str]]) -> None:
        """(tenant, key) whose record was written or removed, for other processes' dense matrices
        (in the caller's transaction); ``key`` "" means the tenant was cleared."""
        self._db.executemany("INSERT INTO dense_log (origin, tenant, entry_key) VALUES (?,?,?)",
                             [(self._origin, t, k) for t, k in rows])  # fmt: skip
        self._writes += 1
        if self._writes % 1000 == 0:
            self._db.execute(
                "DELETE FROM dense_log WHERE ver < (SELECT max(ver) FROM dense_log) - ?", (_DENSE_LOG_KEEP,)
            )

    def _version(self) -> int:
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def _last_ver(self) -> int:
        row = self._db.execute("SELECT max(ver) FROM dense_log").fetchone()
        return 0 if row is None or row[0] is None else int(row[0])

    def _refresh(self, tenant: str, rows: DenseRows) -> DenseRows | None:
        """Apply what other processes logged since ``rows`` was current; None: rebuild instead
        (this process is further behind than the log reaches, or the tenant was cleared)."""
        first = self._db.execute("SELECT min(ver) FROM dense_log").fetchone()[0]
        if first is not None and int(first) > rows.ver + 1:
            return None
        found = self._db.execute(
            "SELECT ver, entry_key FROM dense_log WHERE ver > ? AND tenant = ? AND origin != ? ORDER BY ver",
            (rows.ver, tenant, self._origin),
        ).fetchall()
        if any(k == "" for _, k in found):
            return None
        keys = list(dict.fromkeys(str(k) for _, k in found))
        recs = {r.entry_key: r for r in self.records(tenant, keys)}
        rows.remove([k for k in keys if k not in recs])
        for k in keys:
            if k in recs:
                rows.upsert(recs[k])
        rows.ver = self._last_ver()
        return rows

    def has(self, key: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM entries WHERE entry_key=?", (key,)).fetchone() is not None

    def by_chunks(self, tenant: str, chunk_ids: Iterable[str]) -> set[str]:
        return self._entries_of("chunk_deps", "chunk_id", tenant, chunk_ids)

    def by_terms(self, tenant: str, terms: Iterable[str]) -> set[str]:
        return self._entries_of("term_deps", "term", tenant, term_names(self.cipher, tenant, terms, every=True))

    def _entries_of(self, table: str, column: str, tenant: str, values: Iterable[str]) -> set[str]:
        """Entry keys of ``tenant`` with one of ``values`` in a reverse index (fixed names, never user input)."""
        out: set[str] = set()
        with self._lock:
            for batch in batched(list(values), 500):
                marks = ",".join("?" * len(batch))
                sql = f"SELECT entry_key FROM {table} WHERE tenant=? AND {column} IN ({marks})"
                out.update(r[0] for r in self._db.execute(sql, (tenant, *batch)))
        return out

    def records(self, tenant: str, keys: Iterable[str]) -> list[DepRecord]:
        out: list[DepRecord] = []
        with self._lock:
            for batch in batched(list(keys), 500):
                marks = ",".join("?" * len(batch))
                found = self._db.execute(
                    f"SELECT entry_key, record FROM entries WHERE tenant=? AND entry_key IN ({marks})",
                    (tenant, *batch),
                )
                out.extend(r for k, raw in found if (r := load_record(k, tenant, raw, self.cipher)) is not None)
        return out

    def dense_entered(self, tenant: str, vectors: Vectors) -> set[str]:
        """Entries whose dense candidate list at least one of ``vectors`` would enter.

        A new chunk enters when its cosine to the cached query is ≥ the entry's
        dense cutoff, or when the entry's list was not full (cutoff None).
        """
        if len(vectors) == 0:
            return set()
        dim = vectors.shape[1]
        with self._lock:
            rows = self._dense.get(tenant)
            version = self._version()
            if rows is not None and rows.dim == dim and version != self._data_version:
                rows = self._refresh(tenant, rows)  # another process wrote records
            if rows is None or rows.dim != dim:  # built once, then kept in step by add/remove
                ver = self._last_ver()
                found = self._db.execute("SELECT entry_key, record FROM entries WHERE tenant=?", (tenant,))
                recs = (load_record(k, tenant, raw, self.cipher) for k, raw in found)
                rows = self._dense[tenant] = DenseRows((r for r in recs if r is not None), dim)
                rows.ver = ver
            self._data_version = version
            return rows.entered(vectors)

    def tenant_keys(self, tenant: str) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT entry_key FROM entries WHERE tenant=?", (tenant,))]

    def all_keys(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT entry_key FROM entries")]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM entries").fetchone()[0])

    def clear(self, tenant: str | None = None) -> None:
        with self._lock:
            tenants = (
                [r[0] for r in self._db.execute("SELECT DISTINCT tenant FROM entries")] if tenant is None else [tenant]
            )
            for table in ("entries", "chunk_deps", "term_deps"):
                if tenant is None:
                    self._db.execute(f"DELETE FROM {table}")
                else:
                    self._db.execute(f"DELETE FROM {table} WHERE tenant=?", (tenant,))
            self._log([(t, "") for t in tenants])
            for t in tenants:
                self._dense.pop(t, None)

    def close(self) -> None:
        with self._lock:
            self._db.close()


class DependencyIndex:
    """Persistent reverse indexes chunk → entries and term → entries, per tenant (SQLite).

    The only index of its instance, so nothing is ever local-only and every
    lookup is complete.
    """

    lookup_failures: Final = 0
    has_local_only: Final = False

    def __init__(self, path: Path, cipher: ValueCipher | None = None) -> None:
        self.store = SqliteDeps(path, cipher)

    async def add(self, rec: DepRecord, expires: float) -> bool:
        return await asyncio.to_thread(self.store.add, rec, expires)

    async def remove(self, keys: Sequence[str]) -> None:
        if keys:
            await asyncio.to_thread(self.store.remove, keys)

    async def has(self, key: str) -> bool:
        return await asyncio.to_thread(self.store.has, key)

    async def by_chunks(self, tenant: str, chunk_ids: Iterable[str]) -> set[str]:
        return await asyncio.to_thread(self.store.by_chunks, tenant, list(chunk_ids))

    async def by_terms(self, tenant: str, terms: Iterable[str]) -> set[str]:
        return await asyncio.to_thread(self.store.by_terms, tenant, list(terms))

    async def records(self, tenant: str, keys: Iterable[str]) -> list[DepRecord]:
        return await asyncio.to_thread(self.store.records, tenant, list(keys))

    async def dense_entered(self, tenant: str, vectors: Vectors) -> set[str]:
        """Entries whose dense candidate list at least one of ``vectors`` would enter (see
        :meth:`SqliteDeps.dense_entered`)."""
        if len(vectors) == 0:
            return set()
        return await asyncio.to_thread(self.store.dense_entered, tenant, vectors)

    async def tenant_keys(self, tenant: str) -> list[str]:
        return await asyncio.to_thread(self.store.tenant_keys, tenant)

    async def all_keys(self) -> list[str]:
        return await asyncio.to_thread(self.store.all_keys)

    async def count(self) -> int:
        return await asyncio.to_thread(self.store.count)

    def known_count(self) -> int:
        """The record count, synchronously (one indexed ``count(*)``)."""
        return self.store.count()

    async def clear(self, tenant: str | None = None) -> None:
        await asyncio.to_thread(self.store.clear, tenant)

    async def local_only(self, key: str) -> bool:
        return False  # the only index: nothing is hidden from anyone

    async def take_local_only(self) -> list[str]:
        return []

    async def close(self) -> None:
        await asyncio.to_thread(self.store.close)
