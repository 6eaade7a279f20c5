"""The PostgreSQL store's write steps inside one transaction: chunks out (with their keyword
statistics), chunks in (rows, postings, document frequencies, tenant totals)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson
import psycopg

from ragline.store.writes import analyze
from ragline.types import Chunk, Vectors

__all__ = ["insert_chunks", "remove_docs"]


def remove_docs(
    c: psycopg.Connection[Any], tenant: str, doc_ids: list[str], *, keep_documents: bool
) -> dict[str, tuple[str, str, Any, set[str]]]:
    """Delete the documents' chunks and their keyword statistics; chunk id → (content hash, title,
    metadata, terms) of what was removed."""
    gone = c.execute(
        "DELETE FROM chunks WHERE tenant = %s AND doc_id = ANY(%s) RETURNING key, chunk_id, content_hash, "
        "title, metadata, length",
        (tenant, doc_ids),
    ).fetchall()
    if not keep_documents:
        c.execute("DELETE FROM documents WHERE tenant = %s AND doc_id = ANY(%s)", (tenant, doc_ids))
    if not gone:
        return {}
    keys = [int(r[0]) for r in gone]
    posted = c.execute(
        "DELETE FROM postings WHERE tenant = %s AND key = ANY(%s) RETURNING key, term", (tenant, keys)
    ).fetchall()
    terms_of: dict[int, set[str]] = {}
    for key, term in posted:
        terms_of.setdefault(int(key), set()).add(term)
    df = Counter(t for ts in terms_of.values() for t in ts)
    _add_df(c, tenant, {t: -n for t, n in df.items()})
    c.execute(
        "UPDATE tenant_stats SET n = n - %s, total_len = total_len - %s WHERE tenant = %s",
        (len(gone), sum(int(r[5]) for r in gone), tenant),
    )
    return {str(r[1]): (str(r[2]), str(r[3]), r[4], terms_of.get(int(r[0]), set())) for r in gone}


def insert_chunks(c: psycopg.Connection[Any], tenant: str, rows: list[tuple[Chunk, Vectors]]) -> None:
    if not rows:
        return
    keys = [int(k) for (k,) in c.execute(
        "SELECT nextval(pg_get_serial_sequence('chunks', 'key')) FROM generate_series(1, %s)", (len(rows),)
    ).fetchall()]  # fmt: skip
    postings: list[tuple[str, str, int, str, int, int]] = []
    df: Counter[str] = Counter()
    total = 0
    with c.cursor() as cur:
        records = []
        for key, (ch, vec) in zip(keys, rows, strict=True):
            tf = Counter(analyze(ch.index_text))
            length = sum(tf.values())
            total += length
            df.update(tf.keys())
            postings.extend((tenant, t, key, ch.id, n, length) for t, n in tf.items())
            records.append(
                (tenant, key, ch.id, ch.doc_id, ch.ordinal, ch.text, ch.title, ch.content_hash,
                 orjson.dumps(ch.metadata).decode(), vec, length)
            )  # fmt: skip
        cur.executemany(
            "INSERT INTO chunks (tenant, key, chunk_id, doc_id, ordinal, text, title, content_hash, metadata, "
            "embedding, length) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
            records,
        )
        with cur.copy("COPY postings (tenant, term, key, chunk_id, tf, len) FROM STDIN") as cp:
            for row in postings:
                cp.write_row(row)
    _add_df(c, tenant, dict(df))
    c.execute(
        "INSERT INTO tenant_stats VALUES (%s, %s, %s) ON CONFLICT (tenant) DO UPDATE "
        "SET n = tenant_stats.n + excluded.n, total_len = tenant_stats.total_len + excluded.total_len",
        (tenant, len(rows), total),
    )


def _add_df(c: psycopg.Connection[Any], tenant: str, delta: dict[str, int]) -> None:
    """Document frequencies += ``delta``, in term order (two writers never lock rows crosswise)."""
    if not delta:
        return
    terms = sorted(delta)
    c.execute(
        "INSERT INTO term_df (tenant, term, df) SELECT %s, t, d FROM unnest(%s::text[], %s::int[]) AS u(t, d) "
        "ON CONFLICT (tenant, term) DO UPDATE SET df = term_df.df + excluded.df",
        (tenant, terms, [delta[t] for t in terms]),
    )
    c.execute("DELETE FROM term_df WHERE tenant = %s AND term = ANY(%s) AND df <= 0", (tenant, terms))
