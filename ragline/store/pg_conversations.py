"""Conversations in PostgreSQL (schema migration 2 of :mod:`ragline.store.pg_schema`), shared by every
instance on the database: a follow-up may land on any of them.  The same two tables as the SQLite
version (:mod:`ragline.store.conversations`); an append locks its conversation's row (``FOR UPDATE``)
so concurrent turns of one conversation get consecutive sequence numbers."""

from __future__ import annotations

import time
from typing import Any

import orjson
import psycopg
from psycopg_pool import ConnectionPool

from ragline.errors import StoreError
from ragline.store.base import Conversation, Turn
from ragline.store.conversations import check_limits, turns_from_rows

__all__ = ["PgConversations"]


class PgConversations:
    """:class:`~ragline.store.base.ConversationStore` over the PostgreSQL store's connection pool."""

    def __init__(self, pool: ConnectionPool[Any]) -> None:
        self.pool = pool

    def get(self, tenant: str, conversation_id: str) -> Conversation | None:
        with self.pool.connection() as c:
            row = c.execute(
                "SELECT created_at, updated_at, summary, summarized FROM conversations WHERE tenant=%s AND id=%s",
                (tenant, conversation_id),
            ).fetchone()
            if row is None:
                return None
            rows = c.execute(
                "SELECT role, content, standalone, sources::text, at FROM conversation_turns "
                "WHERE tenant=%s AND id=%s ORDER BY seq",
                (tenant, conversation_id),
            ).fetchall()
        return Conversation(conversation_id, turns_from_rows(rows), row[2], int(row[3]), float(row[0]), float(row[1]))

    def append(
        self, tenant: str, conversation_id: str, turns: list[Turn], *, max_messages: int, max_conversations: int
    ) -> int:
        now = time.time()
        try:
            with self.pool.connection() as c, c.transaction():
                c.execute(
                    "INSERT INTO conversations (tenant, id, created_at, updated_at) VALUES (%s,%s,%s,%s) "
                    "ON CONFLICT DO NOTHING",
                    (tenant, conversation_id, -now, now),  # created_at < 0: created by this transaction
                )
                row = c.execute(
                    "SELECT messages, created_at FROM conversations WHERE tenant=%s AND id=%s FOR UPDATE",
                    (tenant, conversation_id),
                ).fetchone()
                assert row is not None
                created = float(row[1]) < 0
                count = 0
                if created:
                    n = c.execute("SELECT count(*) FROM conversations WHERE tenant=%s", (tenant,)).fetchone()
                    count = int(n[0]) - 1 if n else 0
                existing = None if created else int(row[0])
                check_limits(conversation_id, existing, len(turns), max_messages, count, max_conversations)
                start = existing or 0
                with c.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO conversation_turns VALUES (%s,%s,%s,%s,%s,%s,%s,%s)",
                        [
                            (tenant, conversation_id, start + i, t.role, t.content, t.standalone,
                             orjson.dumps(list(t.sources)).decode(), t.at or now)
                            for i, t in enumerate(turns)
                        ],
                    )  # fmt: skip
                total = start + len(turns)
                c.execute(
                    "UPDATE conversations SET messages=%s, updated_at=%s, created_at=abs(created_at) "
                    "WHERE tenant=%s AND id=%s",
                    (total, now, tenant, conversation_id),
                )
                return total
        except psycopg.Error as exc:
            raise StoreError(f"conversation write failed and was rolled back ({type(exc).__name__})") from None

    def set_summary(self, tenant: str, conversation_id: str, summary: str, summarized: int) -> None:
        with self.pool.connection() as c:
            c.execute(
                "UPDATE conversations SET summary=%s, summarized=%s WHERE tenant=%s AND id=%s AND summarized<=%s",
                (summary, summarized, tenant, conversation_id, summarized),
            )

    def delete(self, tenant: str, conversation_id: str) -> bool:
        with self.pool.connection() as c, c.transaction():
            cur = c.execute("DELETE FROM conversations WHERE tenant=%s AND id=%s", (tenant, conversation_id))
            c.execute("DELETE FROM conversation_turns WHERE tenant=%s AND id=%s", (tenant, conversation_id))
            return bool(cur.rowcount)

    def prune(self, idle_s: float) -> int:
        cutoff = time.time() - idle_s
        with self.pool.connection() as c, c.transaction():
            old = c.execute(
                "DELETE FROM conversations WHERE updated_at < %s RETURNING tenant, id", (cutoff,)
            ).fetchall()
            for tenant, cid in old:
                c.execute("DELETE FROM conversation_turns WHERE tenant=%s AND id=%s", (tenant, cid))
        return len(old)
