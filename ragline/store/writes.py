"""The embedded store's write transactions and its keyword analysis (DESIGN.md §5).

Each write is one SQLite transaction holding the rows, the change-log row and the term clock's
rows (through ``log``), so what every process learns of a change is exactly what was committed.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import orjson
import tantivy

from ragline.errors import StoreError
from ragline.types import Change, Chunk, Document, Vectors

__all__ = ["Log", "analyze", "delete_rows", "diff_chunks", "keyword_query_text", "upsert_rows"]

Log = Callable[[str, list[int], list[int], list[str], list[str], list[str]], int]
"""(tenant, removed keys, added keys, removed chunk ids, added chunk ids, terms) → the change's seq,
written in the caller's transaction."""

_QUERY_SYNTAX = re.compile(r"[^\w]+", re.UNICODE)

_ANALYZER = (
    tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
    .filter(tantivy.Filter.remove_long(40))
    .filter(tantivy.Filter.lowercase())
    .filter(tantivy.Filter.stemmer("english"))
    .build()
)
"""The same analysis as tantivy's ``en_stem`` tokenizer used by the keyword index."""


def analyze(text: str) -> list[str]:
    """Index terms of ``text`` exactly as the keyword index sees them."""
    return list(_ANALYZER.analyze(text))


def keyword_query_text(query: str) -> str:
    """Strip tantivy query syntax so any user text is a plain disjunction of terms.

    Lower-casing also disarms the AND/OR/NOT operators.
    """
    return _QUERY_SYNTAX.sub(" ", query).lower().strip()


def upsert_rows(
    db: sqlite3.Connection, tenant: str, docs: list[tuple[Document, str, list[Chunk], Vectors]], log: Log
) -> tuple[list[int], list[tuple[int, str, str, Vectors]], Change]:
    """One write transaction: replace each document's chunks and log the change.  Returns the keys
    of the replaced rows, the new rows (key, chunk id, indexed text, vector) and the change."""
    old: dict[str, tuple[int, str, str, str, bytes]] = {}
    new_rows: list[tuple[int, str, str, Vectors]] = []
    new_chunks: list[Chunk] = []
    try:
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        for doc, doc_hash, chunks, vecs in docs:
            if len(chunks) != len(vecs):
                raise StoreError(f"document {doc.id!r}: {len(chunks)} chunks but {len(vecs)} vectors")
            for key, cid, h, title, meta, text in db.execute(
                "SELECT key, chunk_id, content_hash, title, metadata, text FROM chunks WHERE tenant=? AND doc_id=?",
                (tenant, doc.id),
            ):
                old[str(cid)] = (int(key), str(h), str(title), str(text), bytes(meta))
            db.execute("DELETE FROM chunks WHERE tenant=? AND doc_id=?", (tenant, doc.id))
            db.execute(
                "INSERT INTO documents(tenant, doc_id, content_hash, title, source, metadata, updated_at) "
                "VALUES(?,?,?,?,?,?,?) ON CONFLICT(tenant, doc_id) DO UPDATE SET "
                "content_hash=excluded.content_hash, title=excluded.title, source=excluded.source, "
                "metadata=excluded.metadata, updated_at=excluded.updated_at",
                (tenant, doc.id, doc_hash, doc.title, doc.source, orjson.dumps(doc.metadata), now),
            )
            for ch, vec in zip(chunks, vecs, strict=True):
                cur = db.execute(
                    "INSERT INTO chunks(tenant, chunk_id, doc_id, ordinal, text, title, content_hash, "
                    "metadata, vector) VALUES(?,?,?,?,?,?,?,?,?)",
                    (
                        tenant,
                        ch.id,
                        ch.doc_id,
                        ch.ordinal,
                        ch.text,
                        ch.title,
                        ch.content_hash,
                        orjson.dumps(ch.metadata),
                        np.ascontiguousarray(vec, np.float32).tobytes(),
                    ),
                )
                new_rows.append((int(cur.lastrowid or 0), ch.id, ch.index_text, vec))
                new_chunks.append(ch)
        meta = {cid: (o[1], o[2], orjson.loads(o[4])) for cid, o in old.items()}
        removed, added, terms = diff_chunks(meta, new_chunks, lambda cid: analyze(f"{old[cid][2]}\n{old[cid][3]}"))
        old_keys = [o[0] for o in old.values()]
        seq = log(tenant, old_keys, [r[0] for r in new_rows], removed, added, terms)
        db.execute("COMMIT")
    except BaseException as exc:
        db.execute("ROLLBACK")
        if isinstance(exc, StoreError):
            raise
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"store write failed and was rolled back: {exc}") from exc
        raise
    return old_keys, new_rows, Change(seq, tenant, tuple(removed), tuple(added), tuple(terms))


def delete_rows(db: sqlite3.Connection, tenant: str, doc_ids: list[str], log: Log) -> tuple[list[int], Change] | None:
    """One write transaction: delete the documents and log the change (None: none of them existed)."""
    removed: list[tuple[int, str, str]] = []
    try:
        db.execute("BEGIN IMMEDIATE")
        for doc_id in doc_ids:
            removed.extend(
                (int(k), str(c), f"{t}\n{x}")
                for k, c, t, x in db.execute(
                    "SELECT key, chunk_id, title, text FROM chunks WHERE tenant=? AND doc_id=?", (tenant, doc_id)
                )
            )
            db.execute("DELETE FROM chunks WHERE tenant=? AND doc_id=?", (tenant, doc_id))
            db.execute("DELETE FROM documents WHERE tenant=? AND doc_id=?", (tenant, doc_id))
        if not removed:
            db.execute("COMMIT")
            return None
        terms = sorted({t for _, _, body in removed for t in analyze(body)})
        ids = [c for _, c, _ in removed]
        seq = log(tenant, [k for k, _, _ in removed], [], ids, [], terms)
        db.execute("COMMIT")
    except sqlite3.Error as exc:
        db.execute("ROLLBACK")
        raise StoreError(f"store delete failed and was rolled back: {exc}") from exc
    return [k for k, _, _ in removed], Change(seq, tenant, tuple(ids), (), tuple(terms))


def diff_chunks(
    old: Mapping[str, tuple[str, str, Any]], new: list[Chunk], old_terms: Callable[[str], Iterable[str]]
) -> tuple[list[str], list[str], list[str]]:
    """What a replacement changes, for every store: (removed chunk ids, added chunk ids, keyword terms).

    ``old``: chunk id → (content hash, title, metadata) of the chunks replaced.  A replacing chunk with
    the same id, text, title and metadata is no change to any retrieval, so it is in neither list; the
    terms are those of every removed and added chunk (``old_terms`` gives a removed chunk's)."""
    same = {
        ch.id
        for ch in new
        if (o := old.get(ch.id)) is not None
        and o[0] == ch.content_hash
        and o[1] == ch.title
        and _json_eq(o[2], ch.metadata)
    }
    removed = [cid for cid in old if cid not in same]
    added = [ch.id for ch in new if ch.id not in same]
    terms: set[str] = set()
    for cid in removed:
        terms.update(old_terms(cid))
    for ch in new:
        if ch.id not in same:
            terms.update(analyze(ch.index_text))
    return removed, added, sorted(terms)


def _json_eq(a: object, b: object) -> bool:
    """JSON equality (``1``, ``1.0`` and ``true`` differ, unlike Python's ``==``)."""
    return orjson.dumps(a, option=orjson.OPT_SORT_KEYS) == orjson.dumps(b, option=orjson.OPT_SORT_KEYS)


def read_documents(db: sqlite3.Connection, tenant: str, doc_ids: list[str]) -> dict[str, Document]:
    """The known documents among ``doc_ids`` with their title, source and metadata (``text`` is empty: a
    document keeps no full text, only its chunks)."""
    out: dict[str, Document] = {}
    for i in range(0, len(doc_ids), 500):
        batch = doc_ids[i : i + 500]
        marks = ",".join("?" * len(batch))
        for did, title, source, meta in db.execute(
            f"SELECT doc_id, title, source, metadata FROM documents WHERE tenant=? AND doc_id IN ({marks})",
            (tenant, *batch),
        ):
            out[str(did)] = Document(str(did), "", str(title), orjson.loads(meta), str(source))
    return out
