"""PostgreSQL store: pgvector HNSW + BM25 in SQL, shared by any number of instances (DESIGN.md §6).

* **One database, many machines.**  Documents, chunks, vectors and the keyword statistics live in
  PostgreSQL; an instance keeps nothing derived but its caches.  Writes are one transaction each,
  serialised per tenant by an advisory lock (writers of other tenants never wait), and append a row
  to ``changes`` whose ``NOTIFY`` tells every instance to catch up before its next read.
* **Dense**: a pgvector HNSW index per tenant partition (cosine, m = 16, ef_construction = 128;
  ``hnsw.ef_search`` is raised to the number of candidates asked for).
* **Keyword**: BM25 (k1 = 1.2, b = 0.75, tantivy's idf) computed in SQL from ``postings`` (term
  frequency and chunk length per term and chunk) and ``term_df``, over the terms the embedded
  store's analyzer makes of the text, so both stores rank alike.
* **One round trip for both lists** (:meth:`PostgresStore.search_both`).

Schema and migrations: :mod:`ragline.store.pg_schema`.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from typing import Any, Final

import numpy as np
import orjson
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql
from psycopg_pool import ConnectionPool

from ragline.errors import ConfigError, InvalidInput, StoreError
from ragline.store.base import DocState
from ragline.store.pg_conversations import PgConversations
from ragline.store.pg_schema import migrate, partition_name
from ragline.store.pg_writes import insert_chunks, remove_docs
from ragline.store.writes import analyze, diff_chunks, keyword_query_text
from ragline.types import Change, Chunk, Document, Scored, Vectors

__all__ = ["PostgresStore"]

CHANNEL: Final = "ragline_changes"
EXACT_DENSE_MAX: Final = 50_000
"""Tenants with at most this many chunks get exact dense search; larger ones the HNSW index.

Why not always the index: the planner picks the HNSW scan or an exact scan by cost, and its choice
can flip as statistics change (autovacuum's ANALYZE); results then differ between two runs of the
same query on the same data, which re-verification reads as changed evidence (measured in the churn
benchmark with two instances: hit rate 0.647 against 0.70 on the embedded store).  One fixed plan
per tenant size keeps a result reproducible; an exact scan of 50k 384-d rows costs ~20 ms."""
_SIZE_TTL_S: Final = 10.0
_GAP_S: Final = 60.0
"""A seq not seen this long after a later one is a rolled-back transaction's, not a slow commit's."""

_BM25: Final = """
WITH q AS (SELECT t, count(*) AS qn FROM unnest(%(terms)s::text[]) AS t GROUP BY t),
st AS (SELECT n::float8 AS n, total_len::float8 / greatest(n, 1) AS avgdl FROM tenant_stats WHERE tenant = %(t)s),
w AS (SELECT d.term, q.qn * ln(1 + (st.n - d.df + 0.5) / (d.df + 0.5)) AS idf
      FROM term_df d JOIN q ON q.t = d.term CROSS JOIN st WHERE d.tenant = %(t)s)
SELECT p.chunk_id,
       round(sum(w.idf * p.tf * 2.2 / (p.tf + 1.2 * (0.25 + 0.75 * p.len / st.avgdl)))::numeric, 6)::float8 AS score
FROM postings p JOIN w ON w.term = p.term CROSS JOIN st
WHERE p.tenant = %(t)s GROUP BY p.chunk_id ORDER BY score DESC, p.chunk_id LIMIT %(k)s
"""
_DENSE: Final = """
SELECT chunk_id, 1 - (embedding <=> %(v)s) AS score FROM chunks
WHERE tenant = %(t)s ORDER BY embedding <=> %(v)s LIMIT %(kd)s
"""


def _configure(conn: psycopg.Connection[Any]) -> None:
    register_vector(conn)


class PostgresStore:
    """The shared Store.  Thread-safe; blocking (run in threads)."""

    @classmethod
    def from_settings(cls, settings: Any, dim: int) -> PostgresStore:
        """``store: postgres`` with ``postgres_dsn`` (how the pipeline opens it)."""
        dsn = settings.postgres_dsn
        if dsn is None:
            raise ConfigError("store: postgres needs postgres_dsn (e.g. postgresql://user:pass@host:5432/db)")
        return cls(dsn.get_secret_value(), dim, pool_size=settings.postgres_pool_size)

    def __init__(self, dsn: str, dim: int, *, pool_size: int = 8) -> None:
        self.dim = dim
        self._dsn = dsn
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                migrate(conn, dim)
        except psycopg.Error as exc:  # the DSN holds a password: name the error class only
            raise StoreError(f"cannot open the PostgreSQL store ({type(exc).__name__}): check postgres_dsn") from None
        self.pool = ConnectionPool(
            dsn, min_size=1, max_size=pool_size, kwargs={"autocommit": True}, configure=_configure, open=True
        )
        self.conversations = PgConversations(self.pool)
        """``conversation_id`` turns, shared by every instance on this database."""
        self._origin = secrets.token_hex(8)
        self._lock = threading.Lock()
        self._version = 1
        self._synced = 1
        with self.pool.connection() as c:
            row = c.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()
        self._scanned = int(row[0]) if row else 0
        self._last_seen = self._scanned
        self._seen_lock = threading.Lock()
        self._gaps: dict[int, float] = {}
        self._partitions: set[str] = set()
        self._sizes: dict[str, tuple[int, float]] = {}
        self._stop = threading.Event()
        self._listener = threading.Thread(target=self._listen, name="ragline-pg-listen", daemon=True)
        self._listener.start()

    # -- keeping in step with other instances ---------------------------------------------
    def _listen(self) -> None:
        """NOTIFY from any instance's commit bumps :meth:`version`; every second the log's max seq is
        read too, so a lost notification (a dropped connection) costs at most a second."""
        backoff = 0.1
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._dsn, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    backoff = 0.1
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0, stop_after=64):
                            seq, _, origin = note.payload.partition(":")
                            if origin != self._origin:  # this instance's own writes bumped it already
                                self._seen(int(seq))
                        row = conn.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()
                        if row:
                            self._seen(int(row[0]))  # a notification lost while disconnected
            except psycopg.Error:
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                with self._seen_lock:
                    self._version += 1  # something may have been missed while disconnected

    def _seen(self, seq: int) -> None:
        """One bump per change, however it was heard of (a bump makes in-flight results uncacheable)."""
        with self._seen_lock:
            # news only: a seq a sync already read (its notification came late) would make the results
            # computed meanwhile uncacheable for nothing; a gap's seq is news (it committed late)
            if seq > max(self._last_seen, self._scanned) or seq in self._gaps:
                self._last_seen = max(self._last_seen, seq)
                self._version += 1

    def version(self) -> int:
        return self._version

    def synced_version(self) -> int:
        """-1 while a seq skipped by a later one has not been seen (a slow commit): every read syncs."""
        return -1 if self._gaps else self._synced

    def sync(self) -> list[Change]:
        """The changes other instances committed since the last call (nothing derived to update here:
        the caller's caches drop what they invalidated)."""
        with self._lock:
            version = self._version
            now = time.monotonic()
            with self.pool.connection() as c:
                rows = c.execute(
                    "SELECT seq, tenant, origin, removed, added, terms FROM changes "
                    "WHERE seq > %s OR seq = ANY(%s) ORDER BY seq",
                    (self._scanned, list(self._gaps)),
                ).fetchall()
            out: list[Change] = []
            for seq, tenant, origin, removed, added, terms in rows:
                seq = int(seq)
                self._gaps.pop(seq, None)
                if seq > self._scanned:  # seqs are taken at insert, so commits can arrive out of order
                    for missing in range(self._scanned + 1, seq):
                        self._gaps.setdefault(missing, now)
                    self._scanned = seq
                if origin != self._origin:
                    out.append(Change(seq, tenant, tuple(removed), tuple(added), tuple(terms)))
            self._gaps = {q: t for q, t in self._gaps.items() if now - t < _GAP_S}
            self._synced = version
            return out

    def recent_changes(self, limit: int) -> list[Change]:
        with self.pool.connection() as c:
            rows = c.execute(
                "SELECT seq, tenant, removed, added, terms FROM changes ORDER BY seq DESC LIMIT %s", (limit,)
            ).fetchall()
        return [Change(int(q), t, tuple(r), tuple(a), tuple(x)) for q, t, r, a, x in reversed(rows)]

    def clock_rows(self) -> list[tuple[str, str, int]]:
        with self.pool.connection() as c:
            return [(t, term, int(seq)) for t, term, seq in c.execute("SELECT tenant, term, seq FROM term_clock")]

    # -- search -----------------------------------------------------------------------------
    def search_dense(self, tenant: str, vector: Vectors, k: int) -> list[Scored]:
        return self.search_both(tenant, vector, "", k, 0)[0]

    def search_keyword(self, tenant: str, query: str, k: int) -> list[Scored]:
        return self.search_both(tenant, None, query, 0, k)[1]

    def search_both(
        self, tenant: str, vector: Vectors | None, query: str, k_dense: int, k_keyword: int
    ) -> tuple[list[Scored], list[Scored]]:
        """Both candidate lists in one round trip (one pipelined transaction)."""
        _check_tenant(tenant)
        terms = analyze(keyword_query_text(query)) if k_keyword > 0 and query else []
        dense: list[Scored] = []
        keyword: list[Scored] = []
        exact = vector is not None and k_dense > 0 and self._size(tenant) <= EXACT_DENSE_MAX
        with self.pool.connection() as c, c.transaction(), c.pipeline():
            cur_d = cur_k = None
            c.execute("SET LOCAL max_parallel_workers_per_gather = 0")  # one summation order: one ranking
            if terms:
                cur_k = c.execute(_BM25, {"terms": terms, "t": tenant, "k": k_keyword})
            if vector is not None and k_dense > 0:
                if exact:  # a fixed plan (see EXACT_DENSE_MAX); set after the keyword query, which needs indexes
                    c.execute("SET LOCAL enable_indexscan = off")
                    c.execute("SET LOCAL enable_bitmapscan = off")
                else:
                    c.execute("SET LOCAL enable_seqscan = off")
                    c.execute(f"SET LOCAL hnsw.ef_search = {max(64, min(int(k_dense), 1000))}")
                v = np.asarray(vector, np.float32).reshape(-1)
                cur_d = c.execute(_DENSE, {"v": v, "t": tenant, "kd": k_dense})
            if cur_d is not None:
                dense = [Scored(cid, float(s)) for cid, s in cur_d.fetchall()]
            if cur_k is not None:
                keyword = [Scored(cid, float(s)) for cid, s in cur_k.fetchall()]
        dense.sort(key=_rank_order)
        keyword.sort(key=_rank_order)
        return dense, keyword

    def _size(self, tenant: str) -> int:
        """The tenant's chunk count, read at most every ``_SIZE_TTL_S`` seconds."""
        now = time.monotonic()
        hit = self._sizes.get(tenant)
        if hit is not None and now - hit[1] < _SIZE_TTL_S:
            return hit[0]
        with self.pool.connection() as c:
            row = c.execute("SELECT n FROM tenant_stats WHERE tenant = %s", (tenant,)).fetchone()
        n = int(row[0]) if row else 0
        self._sizes[tenant] = (n, now)
        return n

    # -- writes -------------------------------------------------------------------------------
    def upsert(self, tenant: str, docs: list[tuple[Document, str, list[Chunk], Vectors]]) -> Change:
        if not docs:
            return Change(0, tenant, (), (), ())
        _check_tenant(tenant)
        try:
            with self.pool.connection() as c, c.transaction():
                self._lock_tenant(c, tenant)
                old = remove_docs(c, tenant, [d.id for d, _, _, _ in docs], keep_documents=True)
                now = time.time()
                rows: list[tuple[Any, ...]] = []
                new_chunks: list[Chunk] = []
                for doc, doc_hash, chunks, vecs in docs:
                    if len(chunks) != len(vecs):
                        raise StoreError(f"document {doc.id!r}: {len(chunks)} chunks but {len(vecs)} vectors")
                    c.execute(
                        "INSERT INTO documents VALUES (%s,%s,%s,%s,%s,%s,%s) ON CONFLICT (tenant, doc_id) DO UPDATE "
                        "SET content_hash = excluded.content_hash, title = excluded.title, source = excluded.source, "
                        "metadata = excluded.metadata, updated_at = excluded.updated_at",
                        (tenant, doc.id, doc_hash, doc.title, doc.source, orjson.dumps(doc.metadata).decode(), now),
                    )
                    for ch, vec in zip(chunks, vecs, strict=True):
                        rows.append((ch, np.asarray(vec, np.float32)))
                        new_chunks.append(ch)
                insert_chunks(c, tenant, rows)
                removed, added, terms = diff_chunks({c: o[:3] for c, o in old.items()}, new_chunks, lambda c: old[c][3])
                return self._log(c, tenant, removed, added, terms)
        except psycopg.Error as exc:
            raise StoreError(f"store write failed and was rolled back ({type(exc).__name__}: {exc.sqlstate})") from None

    def delete(self, tenant: str, doc_ids: list[str]) -> Change:
        if not doc_ids:
            return Change(0, tenant, (), (), ())
        _check_tenant(tenant)
        try:
            with self.pool.connection() as c, c.transaction():
                self._lock_tenant(c, tenant)
                old = remove_docs(c, tenant, doc_ids, keep_documents=False)
                if not old:
                    return Change(0, tenant, (), (), ())
                return self._log(c, tenant, list(old), [], sorted({t for o in old.values() for t in o[3]}))
        except psycopg.Error as exc:
            raise StoreError(
                f"store delete failed and was rolled back ({type(exc).__name__}: {exc.sqlstate})"
            ) from None

    def _lock_tenant(self, c: psycopg.Connection[Any], tenant: str) -> None:
        """Writers of one tenant take turns (BM25 statistics are read-modify-write); others do not wait."""
        c.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 7))", (tenant,))
        if tenant not in self._partitions:
            c.execute(
                sql.SQL("CREATE TABLE IF NOT EXISTS {} PARTITION OF chunks FOR VALUES IN ({})").format(
                    sql.Identifier(partition_name(tenant)), sql.Literal(tenant)
                )
            )
            self._partitions.add(tenant)

    def _log(
        self, c: psycopg.Connection[Any], tenant: str, removed: list[str], added: list[str], terms: list[str]
    ) -> Change:
        row = c.execute(
            "INSERT INTO changes (tenant, origin, at, removed, added, terms) VALUES (%s,%s,%s,%s,%s,%s) RETURNING seq",
            (tenant, self._origin, time.time(), orjson.dumps(removed).decode(), orjson.dumps(added).decode(),
             orjson.dumps(terms).decode()),
        ).fetchone()  # fmt: skip
        assert row is not None
        seq = int(row[0])
        c.execute(
            "INSERT INTO term_clock (tenant, term, seq) SELECT %s, t, %s FROM unnest(%s::text[]) AS t "
            "ON CONFLICT (tenant, term) DO UPDATE SET seq = excluded.seq",
            (tenant, seq, [*terms, ""]),
        )
        c.execute(f"NOTIFY {CHANNEL}, '{seq}:{self._origin}'")
        with self._seen_lock:
            self._last_seen = max(self._last_seen, seq)
            self._version += 1
        return Change(seq, tenant, tuple(removed), tuple(added), tuple(terms))

    # -- read helpers -----------------------------------------------------------------------
    def doc_state(self, tenant: str, doc_ids: list[str]) -> dict[str, DocState]:
        with self.pool.connection() as c:
            docs = c.execute(
                "SELECT doc_id, content_hash FROM documents WHERE tenant = %s AND doc_id = ANY(%s)", (tenant, doc_ids)
            ).fetchall()
            chunks = c.execute(
                "SELECT doc_id, chunk_id FROM chunks WHERE tenant = %s AND doc_id = ANY(%s) ORDER BY doc_id, ordinal",
                (tenant, doc_ids),
            ).fetchall()
        by_doc: dict[str, list[str]] = {}
        for d, cid in chunks:
            by_doc.setdefault(d, []).append(cid)
        return {d: DocState(d, h, tuple(by_doc.get(d, ()))) for d, h in docs}

    def chunks(self, tenant: str, chunk_ids: list[str]) -> dict[str, Chunk]:
        with self.pool.connection() as c:
            rows = c.execute(
                "SELECT chunk_id, doc_id, ordinal, text, title, content_hash, metadata FROM chunks "
                "WHERE tenant = %s AND chunk_id = ANY(%s)",
                (tenant, chunk_ids),
            ).fetchall()
        return {r[0]: Chunk(r[0], r[1], int(r[2]), r[3], r[4], r[5], r[6]) for r in rows}

    def documents(self, tenant: str, doc_ids: list[str]) -> dict[str, Document]:
        """The known documents among ``doc_ids`` (``text`` empty: only chunks keep text)."""
        with self.pool.connection() as c:
            rows = c.execute(
                "SELECT doc_id, title, source, metadata FROM documents WHERE tenant = %s AND doc_id = ANY(%s)",
                (tenant, doc_ids),
            ).fetchall()
        return {r[0]: Document(r[0], "", r[1], r[3], r[2]) for r in rows}

    def vectors(self, tenant: str, chunk_ids: list[str]) -> Vectors:
        with self.pool.connection() as c:
            rows = c.execute(
                "SELECT chunk_id, embedding FROM chunks WHERE tenant = %s AND chunk_id = ANY(%s)", (tenant, chunk_ids)
            ).fetchall()
        found = {cid: np.asarray(v.to_numpy() if hasattr(v, "to_numpy") else v, np.float32) for cid, v in rows}
        out = np.zeros((len(chunk_ids), self.dim), dtype=np.float32)
        for i, cid in enumerate(chunk_ids):
            if cid in found:
                out[i] = found[cid]
        return out

    def document_ids(self, tenant: str, limit: int = 1000, offset: int = 0) -> list[str]:
        with self.pool.connection() as c:
            return [
                r[0]
                for r in c.execute(
                    "SELECT doc_id FROM documents WHERE tenant = %s ORDER BY doc_id LIMIT %s OFFSET %s",
                    (tenant, limit, offset),
                )
            ]

    def analyze(self, text: str) -> list[str]:
        """The embedded store's analyzer: both stores make the same terms of a text."""
        return analyze(text)

    def stats(self, tenant: str | None = None) -> dict[str, int]:
        where, args = ("WHERE tenant = %s", (tenant,)) if tenant is not None else ("", ())
        with self.pool.connection() as c:
            d = c.execute(f"SELECT count(*) FROM documents {where}", args).fetchone()
            n = c.execute(f"SELECT coalesce(sum(n), 0) FROM tenant_stats {where}", args).fetchone()
        return {"documents": int(d[0]) if d else 0, "chunks": int(n[0]) if n else 0}

    def meta(self, key: str) -> str | None:
        """A value of the store's own record (``dim``, ``embedder``: what its vectors were made with)."""
        with self.pool.connection() as c:
            row = c.execute("SELECT value FROM ragline_meta WHERE key = %s", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self.pool.connection() as c:
            c.execute(
                "INSERT INTO ragline_meta VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def tenants(self) -> list[str]:
        with self.pool.connection() as c:
            return [r[0] for r in c.execute("SELECT tenant FROM tenant_stats WHERE n > 0 ORDER BY tenant")]

    def close(self) -> None:
        self._stop.set()
        self._listener.join(timeout=3)
        self.pool.close()


_TENANT_SAFE: Final = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _check_tenant(tenant: str) -> None:
    if not _TENANT_SAFE.match(tenant):
        raise InvalidInput(f"invalid tenant {tenant!r}: use 1-64 of A-Z a-z 0-9 _ . -")


def _rank_order(s: Scored) -> tuple[float, str]:
    return (-s.score, s.chunk_id)
