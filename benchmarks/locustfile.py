"""Locust load test for a running ragline server: POST /v1/query (cached + uncached mix) and POST /v1/search.

Usage (the server must already be running and have documents ingested)::

    ragline serve --workers 2 --port 8080 &
    locust -f benchmarks/locustfile.py --host http://127.0.0.1:8080 \\
        --headless -u 32 -r 8 -t 60s --csv benchmarks/results/locust

``--host`` picks the server (default ``http://127.0.0.1:8080``; set it explicitly
for any other machine).  Without ``--headless`` locust serves its web UI on
http://127.0.0.1:8089.  Tuning, through environment variables:

``RAGLINE_LOCUST_QUERIES``     JSON-lines file of queries (``{"text": ...}`` as in BEIR
                               ``queries.jsonl``); default ../shared/data/scifact/queries.jsonl
                               when present, else a few built-in questions
``RAGLINE_LOCUST_HOT``         how many queries form the hot (cached) set (default 50)
``RAGLINE_LOCUST_UNCACHED``    share of /v1/query requests sent with ``"cache": "bypass"``
                               (default 0.05); set 0 to measure exact hits only
``RAGLINE_LOCUST_API_KEY``     sent as ``Authorization: Bearer …`` when set

The task weights give ~80 % queries (hot-set hits, plus the uncached share, which
runs the whole pipeline including the LLM) and ~20 % searches.  Query requests
whose response says the answer came from the cache are reported under the name
``/v1/query [hit]``, others under ``/v1/query [miss]``, so the two latency
distributions stay apart in locust's statistics.

For a bounded, scriptable measurement use ``ragline bench --url URL --queries FILE``
(or ``python benchmarks/hotpath.py`` for the hot-path benchmark); this file is for
exploring by hand.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import orjson
from locust import HttpUser, between, task

_DEFAULT_QUERIES = Path(__file__).resolve().parents[1] / "../shared/data/scifact/queries.jsonl"
_FALLBACK = [
    "What is reciprocal rank fusion?",
    "How does BM25 score documents?",
    "What is a dense retriever?",
    "How should documents be chunked for retrieval?",
    "What does a vector index do?",
]


def _load_queries() -> list[str]:
    path = Path(os.environ.get("RAGLINE_LOCUST_QUERIES", str(_DEFAULT_QUERIES)))
    if not path.is_file():
        return list(_FALLBACK)
    out = []
    for line in path.read_bytes().splitlines():
        if line.strip():
            d = orjson.loads(line)
            text = d.get("text") or d.get("query") if isinstance(d, dict) else None
            if isinstance(text, str) and text.strip():
                out.append(text)
    return out or list(_FALLBACK)


QUERIES = _load_queries()
HOT = QUERIES[: max(1, int(os.environ.get("RAGLINE_LOCUST_HOT", "50")))]
COLD = QUERIES[len(HOT) :] or QUERIES
UNCACHED_SHARE = float(os.environ.get("RAGLINE_LOCUST_UNCACHED", "0.05"))
_API_KEY = os.environ.get("RAGLINE_LOCUST_API_KEY")
HEADERS = {"content-type": "application/json", **({"authorization": f"Bearer {_API_KEY}"} if _API_KEY else {})}


class RaglineUser(HttpUser):
    host = "http://127.0.0.1:8080"
    wait_time = between(0.0, 0.01)

    def _post(self, path: str, payload: dict[str, Any], name: str | None = None) -> None:
        with self.client.post(
            path, data=orjson.dumps(payload), headers=HEADERS, name=name or path, catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
            else:
                resp.success()

    @task(8)
    def query(self) -> None:
        if random.random() < UNCACHED_SHARE:
            payload = {"query": random.choice(COLD), "cache": "bypass", "timings": False}
            self._post("/v1/query", payload, "/v1/query [bypass]")
            return
        payload = {"query": random.choice(HOT), "timings": False}
        with self.client.post(
            "/v1/query", data=orjson.dumps(payload), headers=HEADERS, name="/v1/query", catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            # the cache info is spliced in first: no need to parse the whole body
            hit = b'"kind":"exact"' in resp.content[:120]
            resp.request_meta["name"] = "/v1/query [hit]" if hit else "/v1/query [miss]"
            resp.success()

    @task(2)
    def search(self) -> None:
        self._post("/v1/search", {"query": random.choice(QUERIES), "k": 10})
