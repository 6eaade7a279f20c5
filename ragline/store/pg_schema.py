"""The PostgreSQL store's schema and its versioned migrations (DESIGN.md §6).

Applied at start-up under an advisory lock, so instances starting together migrate once.  Every
table leads with the tenant; ``chunks`` is partitioned by tenant (``LIST``, one partition per
tenant, created on its first write), so each tenant has its own pgvector HNSW index and a search
never walks another tenant's graph.  The keyword index is BM25 computed in SQL from term statistics
(``postings``: term frequency per chunk; ``term_df``: document frequency per term; ``tenant_stats``:
chunk count and total length), with the embedded store's analyzer doing the tokenizing, so both
stores rank alike (PostgreSQL's ``ts_rank_cd`` is not BM25; see docs/NOTES.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Final

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "migrate", "partition_name"]

_LOCK: Final = 0x7261676C  # "ragl": the advisory lock every migrating instance takes


def _v1(dim: int) -> list[str]:
    return [
        "CREATE EXTENSION IF NOT EXISTS vector",
        """CREATE TABLE IF NOT EXISTS ragline_meta (key text PRIMARY KEY, value text NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS documents (
            tenant text NOT NULL, doc_id text NOT NULL, content_hash text NOT NULL, title text NOT NULL,
            source text NOT NULL, metadata jsonb NOT NULL, updated_at double precision NOT NULL,
            PRIMARY KEY (tenant, doc_id))""",
        f"""CREATE TABLE IF NOT EXISTS chunks (
            tenant text NOT NULL, key bigserial NOT NULL, chunk_id text NOT NULL, doc_id text NOT NULL,
            ordinal int NOT NULL, text text NOT NULL, title text NOT NULL, content_hash text NOT NULL,
            metadata jsonb NOT NULL, embedding vector({int(dim)}) NOT NULL, length int NOT NULL,
            PRIMARY KEY (tenant, key), UNIQUE (tenant, chunk_id)) PARTITION BY LIST (tenant)""",
        "CREATE INDEX IF NOT EXISTS chunks_doc ON chunks (tenant, doc_id)",
        """CREATE INDEX IF NOT EXISTS chunks_hnsw ON chunks
            USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 128)""",
        """CREATE TABLE IF NOT EXISTS postings (
            tenant text NOT NULL, term text NOT NULL, key bigint NOT NULL, chunk_id text NOT NULL,
            tf int NOT NULL, len int NOT NULL, PRIMARY KEY (tenant, term, key))""",
        "CREATE INDEX IF NOT EXISTS postings_key ON postings (tenant, key)",
        """CREATE TABLE IF NOT EXISTS term_df (
            tenant text NOT NULL, term text NOT NULL, df int NOT NULL, PRIMARY KEY (tenant, term))""",
        """CREATE TABLE IF NOT EXISTS tenant_stats (
            tenant text PRIMARY KEY, n bigint NOT NULL, total_len bigint NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS changes (
            seq bigserial PRIMARY KEY, tenant text NOT NULL, origin text NOT NULL, at double precision NOT NULL,
            removed jsonb NOT NULL, added jsonb NOT NULL, terms jsonb NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS term_clock (
            tenant text NOT NULL, term text NOT NULL, seq bigint NOT NULL, PRIMARY KEY (tenant, term))""",
    ]


def _v2(dim: int) -> list[str]:
    """Conversations (``conversation_id``): one row per conversation, one per message."""
    return [
        """CREATE TABLE IF NOT EXISTS conversations (
            tenant text NOT NULL, id text NOT NULL, created_at double precision NOT NULL,
            updated_at double precision NOT NULL, summary text NOT NULL DEFAULT '', summarized int NOT NULL DEFAULT 0,
            messages int NOT NULL DEFAULT 0, PRIMARY KEY (tenant, id))""",
        "CREATE INDEX IF NOT EXISTS conversations_idle ON conversations (updated_at)",
        """CREATE TABLE IF NOT EXISTS conversation_turns (
            tenant text NOT NULL, id text NOT NULL, seq int NOT NULL, role text NOT NULL, content text NOT NULL,
            standalone text NOT NULL, sources jsonb NOT NULL, at double precision NOT NULL,
            PRIMARY KEY (tenant, id, seq))""",
    ]


MIGRATIONS: Final[list[Callable[[int], list[str]]]] = [_v1, _v2]
"""Migration i brings the schema from version i to i + 1; append, never edit."""
SCHEMA_VERSION: Final = len(MIGRATIONS)


def partition_name(tenant: str) -> str:
    """A fixed-length identifier for a tenant's chunk partition (tenant names are user input)."""
    return "chunks_t_" + hashlib.blake2b(tenant.encode(), digest_size=8).hexdigest()


def migrate(conn: Any, dim: int) -> int:
    """Bring the schema to :data:`SCHEMA_VERSION`; returns the version found.  Refuses a store whose
    vectors have another dimension (another embedder wrote it)."""
    from ragline.errors import StoreError

    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS ragline_schema (version int NOT NULL)")
        row = conn.execute("SELECT version FROM ragline_schema").fetchone()
        found = int(row[0]) if row else 0
        if found > SCHEMA_VERSION:
            raise StoreError(f"the PostgreSQL schema is at version {found}, newer than this ragline ({SCHEMA_VERSION})")
        for i in range(found, SCHEMA_VERSION):
            for sql in MIGRATIONS[i](dim):
                conn.execute(sql)
        if row is None:
            conn.execute("INSERT INTO ragline_schema VALUES (%s)", (SCHEMA_VERSION,))
        else:
            conn.execute("UPDATE ragline_schema SET version = %s", (SCHEMA_VERSION,))
        stored = conn.execute("SELECT value FROM ragline_meta WHERE key = 'dim'").fetchone()
        if stored is None:
            conn.execute("INSERT INTO ragline_meta VALUES ('dim', %s)", (str(dim),))
        elif int(stored[0]) != dim:
            raise StoreError(
                f"the PostgreSQL store holds {stored[0]}-dim vectors but the embedder gives {dim}; "
                "use another database or schema"
            )
    return found
