"""Conversation storage: SQLite (the embedded store's database) and in memory (stores that keep none).

Two tables: one row per conversation (its summary and message count) and one per message, so
appending a turn writes two rows, not the whole conversation again.  Appends are one transaction
(``BEGIN IMMEDIATE``): every process on the data dir sees a turn whole or not at all, and two
concurrent turns of one conversation both land, in commit order.  The PostgreSQL version is
:mod:`ragline.store.pg_conversations`; both implement :class:`~ragline.store.base.ConversationStore`.
"""

from __future__ import annotations

import functools
import sqlite3
import threading
import time
from collections.abc import Iterable
from typing import Any, Final

import orjson

from ragline.errors import PayloadTooLarge
from ragline.store.base import Conversation, Turn

__all__ = [
    "SCHEMA",
    "MemoryConversations",
    "SqliteConversations",
    "WithConversations",
    "check_limits",
    "turns_from_rows",
]

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS conversations (
    tenant TEXT NOT NULL, id TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL,
    summary TEXT NOT NULL DEFAULT '', summarized INTEGER NOT NULL DEFAULT 0, messages INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS conversations_idle ON conversations (updated_at);
CREATE TABLE IF NOT EXISTS conversation_turns (
    tenant TEXT NOT NULL, id TEXT NOT NULL, seq INTEGER NOT NULL, role TEXT NOT NULL, content TEXT NOT NULL,
    standalone TEXT NOT NULL, sources BLOB NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (tenant, id, seq)
) WITHOUT ROWID;
"""


def check_limits(conversation_id: str, existing: int | None, adding: int, max_messages: int, tenant_count: int,
                 max_conversations: int) -> None:  # fmt: skip
    """``PayloadTooLarge`` when an append would pass a conversation's or a tenant's limit."""
    if existing is None and tenant_count >= max_conversations:
        raise PayloadTooLarge(
            f"this tenant holds {tenant_count} conversations (conversation.max_conversations_per_tenant); "
            "DELETE /v1/conversations/{id} some, or wait for idle ones to expire"
        )
    if (existing or 0) + adding > max_messages:
        raise PayloadTooLarge(
            f"conversation {conversation_id!r} holds {existing} messages, the limit is {max_messages} "
            f"({max_messages // 2} turns, conversation.max_turns); start a new conversation"
        )


def turns_from_rows(rows: Iterable[tuple[Any, ...]]) -> tuple[Turn, ...]:
    """(role, content, standalone, sources JSON, at) rows in order → turns."""
    return tuple(Turn(r, c, s, tuple(orjson.loads(src)), float(at)) for r, c, s, src, at in rows)


def _sources(t: Turn) -> bytes:
    return orjson.dumps(list(t.sources))


class SqliteConversations:
    """Conversations in a SQLite database shared with the embedded store (its connection and lock)."""

    def __init__(self, db: sqlite3.Connection, lock: threading.RLock) -> None:
        self._db = db
        self._lock = lock
        with lock:
            db.executescript(SCHEMA)

    def get(self, tenant: str, conversation_id: str) -> Conversation | None:
        with self._lock:
            row = self._db.execute(
                "SELECT created_at, updated_at, summary, summarized FROM conversations WHERE tenant=? AND id=?",
                (tenant, conversation_id),
            ).fetchone()
            if row is None:
                return None
            rows = self._db.execute(
                "SELECT role, content, standalone, sources, at FROM conversation_turns "
                "WHERE tenant=? AND id=? ORDER BY seq",
                (tenant, conversation_id),
            ).fetchall()
        return Conversation(conversation_id, turns_from_rows(rows), row[2], int(row[3]), float(row[0]), float(row[1]))

    def append(
        self, tenant: str, conversation_id: str, turns: list[Turn], *, max_messages: int, max_conversations: int
    ) -> int:
        db, now = self._db, time.time()
        with self._lock:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute(
                    "SELECT messages FROM conversations WHERE tenant=? AND id=?", (tenant, conversation_id)
                ).fetchone()
                existing = None if row is None else int(row[0])
                count = 0
                if existing is None:
                    count = db.execute("SELECT count(*) FROM conversations WHERE tenant=?", (tenant,)).fetchone()[0]
                check_limits(conversation_id, existing, len(turns), max_messages, int(count), max_conversations)
                if existing is None:
                    db.execute(
                        "INSERT INTO conversations (tenant, id, created_at, updated_at) VALUES (?,?,?,?)",
                        (tenant, conversation_id, now, now),
                    )
                start = existing or 0
                db.executemany(
                    "INSERT INTO conversation_turns VALUES (?,?,?,?,?,?,?,?)",
                    [
                        (tenant, conversation_id, start + i, t.role, t.content, t.standalone, _sources(t), t.at or now)
                        for i, t in enumerate(turns)
                    ],
                )
                total = start + len(turns)
                db.execute(
                    "UPDATE conversations SET messages=?, updated_at=? WHERE tenant=? AND id=?",
                    (total, now, tenant, conversation_id),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return total

    def set_summary(self, tenant: str, conversation_id: str, summary: str, summarized: int) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE conversations SET summary=?, summarized=? WHERE tenant=? AND id=? AND summarized<=?",
                (summary, summarized, tenant, conversation_id, summarized),
            )

    def delete(self, tenant: str, conversation_id: str) -> bool:
        db = self._db
        with self._lock:
            db.execute("BEGIN IMMEDIATE")
            try:
                n = db.execute("DELETE FROM conversations WHERE tenant=? AND id=?", (tenant, conversation_id)).rowcount
                db.execute("DELETE FROM conversation_turns WHERE tenant=? AND id=?", (tenant, conversation_id))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return bool(n)

    def prune(self, idle_s: float) -> int:
        db, cutoff = self._db, time.time() - idle_s
        with self._lock:
            old = db.execute(
                "SELECT tenant, id FROM conversations WHERE updated_at < ? LIMIT 1000", (cutoff,)
            ).fetchall()
            for tenant, cid in old:
                self.delete(tenant, cid)
        return len(old)


class WithConversations:
    """Mixin of the embedded store: ``conversations`` in its own SQLite database (``_db``, ``_db_lock``),
    so every process on the data dir sees the same conversations."""

    _db: sqlite3.Connection
    _db_lock: threading.RLock

    @functools.cached_property
    def conversations(self) -> SqliteConversations:
        return SqliteConversations(self._db, self._db_lock)


class MemoryConversations:
    """Conversations in this process only: what a store without conversation support gets (tests,
    custom stores).  Not shared between workers or instances."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[tuple[str, str], Conversation] = {}

    def get(self, tenant: str, conversation_id: str) -> Conversation | None:
        with self._lock:
            return self._data.get((tenant, conversation_id))

    def append(
        self, tenant: str, conversation_id: str, turns: list[Turn], *, max_messages: int, max_conversations: int
    ) -> int:
        now = time.time()
        with self._lock:
            c = self._data.get((tenant, conversation_id))
            count = sum(1 for t, _ in self._data if t == tenant) if c is None else 0
            check_limits(conversation_id, None if c is None else len(c.turns), len(turns), max_messages, count,
                         max_conversations)  # fmt: skip
            c = c or Conversation(conversation_id, created_at=now)
            stamped = tuple(Turn(t.role, t.content, t.standalone, t.sources, t.at or now) for t in turns)
            self._data[(tenant, conversation_id)] = Conversation(
                c.id, c.turns + stamped, c.summary, c.summarized, c.created_at, now
            )
            return len(c.turns) + len(turns)

    def set_summary(self, tenant: str, conversation_id: str, summary: str, summarized: int) -> None:
        with self._lock:
            c = self._data.get((tenant, conversation_id))
            if c is not None and summarized >= c.summarized:
                self._data[(tenant, conversation_id)] = Conversation(
                    c.id, c.turns, summary, summarized, c.created_at, c.updated_at
                )

    def delete(self, tenant: str, conversation_id: str) -> bool:
        with self._lock:
            return self._data.pop((tenant, conversation_id), None) is not None

    def prune(self, idle_s: float) -> int:
        cutoff = time.time() - idle_s
        with self._lock:
            old = [k for k, c in self._data.items() if c.updated_at < cutoff]
            for k in old:
                del self._data[k]
        return len(old)
