"""Keyword retrieval in PostgreSQL: ``ts_rank_cd`` against BM25 computed in SQL, on BEIR SciFact (issue 8).

    python benchmarks/pg_keyword.py [--data ../shared/data/scifact] [--out benchmarks/results]

PostgreSQL's own full-text ranking, ``ts_rank_cd`` over ``to_tsvector('english', title || text)`` with
the query's terms OR-ed (``plainto_tsquery`` would AND them and match almost nothing), against the
PostgreSQL store's BM25 in SQL and the embedded store's tantivy BM25, on the same documents (one chunk
per document, keyword only: the vectors are a constant), nDCG@10 at document level with ranx.  This
is the measurement behind the store's choice of BM25 in SQL (docs/NOTES.md).  Writes ``pg_keyword.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from _common import DATA, RESULTS, load_beir, percentiles

from ragline.ingest.chunking import doc_hash
from ragline.store.embedded import EmbeddedStore
from ragline.store.postgres import PostgresStore
from ragline.types import Chunk, Document


def _rows(docs: list[dict[str, Any]]) -> list[tuple[Document, str, list[Chunk], Any]]:
    out = []
    for d in docs:
        doc = Document(str(d["_id"]), d["text"], d.get("title", ""))
        ch = Chunk(f"{doc.id}#0", doc.id, 0, doc.text, doc.title, doc_hash(doc), {})
        out.append((doc, doc_hash(doc), [ch], np.ones((1, 2), np.float32)))
    return out


def _ndcg(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]]) -> float:
    from ranx import Qrels, Run, evaluate

    run = {q: r or {"__none__": 0.0} for q, r in run.items()}
    return round(float(evaluate(Qrels(qrels), Run(run), "ndcg@10")), 4)


def main() -> None:
    import pgserver

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA / "scifact")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    queries, qrels = load_beir(a.data)
    docs = [orjson.loads(x) for x in (a.data / "corpus.jsonl").read_bytes().splitlines()]
    report: dict[str, Any] = {"dataset": str(a.data), "documents": len(docs), "queries": len(queries)}
    with tempfile.TemporaryDirectory(prefix="ragline-pgkw-") as tmp:
        srv = pgserver.get_server(Path(tmp) / "pg", cleanup_mode="stop")
        try:
            pg, emb = PostgresStore(srv.get_uri(), 2), EmbeddedStore(Path(tmp) / "emb", 2)
            rows = _rows(docs)
            for store in (pg, emb):
                for i in range(0, len(rows), 500):
                    store.upsert("t", rows[i : i + 500])
            with pg.pool.connection() as c:
                c.execute(
                    "CREATE TABLE fts AS SELECT doc_id, to_tsvector('english', title || ' ' || text) AS v "
                    "FROM chunks WHERE tenant = 't'"
                )
                c.execute("CREATE INDEX ON fts USING gin (v)")
                c.execute("ANALYZE fts")

            def ts_rank(q: str) -> dict[str, float]:
                with pg.pool.connection() as c:
                    found = c.execute(
                        "WITH q AS (SELECT replace(plainto_tsquery('english', %s)::text, '&', '|')::tsquery AS q) "
                        "SELECT doc_id, ts_rank_cd(v, q.q) AS s FROM fts, q WHERE v @@ q.q ORDER BY s DESC LIMIT 100",
                        (q,),
                    ).fetchall()
                return {d: float(s) for d, s in found}

            methods = {
                "postgres_ts_rank_cd": ts_rank,
                "postgres_bm25_sql": lambda q: {h.chunk_id[:-2]: h.score for h in pg.search_keyword("t", q, 100)},
                "embedded_tantivy_bm25": lambda q: {h.chunk_id[:-2]: h.score for h in emb.search_keyword("t", q, 100)},
            }
            for name, fn in methods.items():
                run, lat = {}, []
                for qid, q in queries.items():
                    t0 = time.perf_counter()
                    run[qid] = fn(q)
                    lat.append(time.perf_counter() - t0)
                report[name] = {"ndcg@10": _ndcg(run, qrels), "latency": percentiles(lat)}
                print(name, report[name], flush=True)
            pg.close()
            emb.close()
        finally:
            srv.cleanup()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "pg_keyword.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
