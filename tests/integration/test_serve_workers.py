"""``ragline serve --workers 2``: a real uvicorn master with two worker processes (issue 8).

``/metrics`` must report the sum over the workers, whichever worker answers the scrape.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.fixtures.serve import serve


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A server with two workers and the directory their metric sample files go to."""
    prom = tmp_path / "prom"
    prom.mkdir()
    with serve(tmp_path, {"PROMETHEUS_MULTIPROC_DIR": str(prom)}, "--workers", "2") as url:
        yield url, prom


def _count(text: str, route: str) -> float:
    """Sum of ``ragline_http_request_duration_seconds_count`` samples of ``route``."""
    pat = re.compile(r"^ragline_http_request_duration_seconds_count\{([^}]*)\} (\S+)$", re.M)
    return sum(float(v) for labels, v in pat.findall(text) if f'route="{route}"' in labels)


def _settled_count(url: str, route: str) -> int:
    """The count of ``route`` once two scrapes 0.2 s apart agree."""
    last = -1.0
    for _ in range(50):
        now = _count(httpx.get(url + "/metrics", timeout=10, headers={"connection": "close"}).text, route)
        if now == last:
            return int(now)
        last = now
        time.sleep(0.2)
    raise AssertionError(f"the {route} count kept changing with no requests sent")


def _per_worker(prom: Path, route: str) -> dict[str, float]:
    """Each worker's own count of ``route`` requests, read from its sample file alone."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    out: dict[str, float] = {}
    for f in prom.glob("histogram_*.db"):
        with tempfile.TemporaryDirectory() as one:
            shutil.copy(f, one)
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=one)  # type: ignore[no-untyped-call]
            out[f.stem.split("_")[-1]] = _count(generate_latest(registry).decode(), route)
    return out


def test_metrics_are_summed_over_workers(two_workers: tuple[str, Path]) -> None:
    url, prom = two_workers

    def one(_: int) -> int:  # a new connection per request: the workers compete for each accept
        return httpx.get(url + "/healthz", timeout=10, headers={"connection": "close"}).status_code

    # The kernel may hand a whole batch to one worker when the machine is loaded, so send bounded batches
    # until both workers have served some (at most 10 x 40); the sum must hold after every batch.
    # `ragline serve` itself asks /healthz once to announce that it is serving: counted from here on
    # (a worker counts a request just after its response is sent, so read until two scrapes agree)
    sent = _settled_count(url, "/healthz")
    per_worker: dict[str, float] = {}
    with ThreadPoolExecutor(8) as pool:
        for _ in range(10):
            assert set(pool.map(one, range(40))) == {200}
            sent += 40
            scrapes = [httpx.get(url + "/metrics", timeout=10, headers={"connection": "close"}).text for _ in range(4)]
            assert {_count(s, "/healthz") for s in scrapes} == {float(sent)}  # every scrape, from either worker
            per_worker = _per_worker(prom, "/healthz")
            assert sum(per_worker.values()) == sent, per_worker
            if sum(v > 0 for v in per_worker.values()) == 2:
                break
    # the master process has a (zero) file too; both workers served some of the requests
    assert sum(v > 0 for v in per_worker.values()) == 2, per_worker


DOCS = [
    {"id": "paris", "title": "Paris", "text": "Paris is the capital of France. The Eiffel Tower opened in 1889."},
    {"id": "cats", "title": "Cats", "text": "Domestic cats sleep for sixteen hours a day and purr when content."},
    {"id": "tea", "title": "Tea", "text": "Green tea contains caffeine and antioxidants called catechins."},
]
Q = "When did the Eiffel Tower open?"


def _fresh(url: str, path: str, body: dict[str, object]) -> dict[str, object]:
    """One request on a new connection, so the two workers share the requests between them."""
    r = httpx.post(url + path, json=body, timeout=30, headers={"connection": "close"})
    assert r.status_code == 200, r.text
    out: dict[str, object] = r.json()
    return out


def _evidence(answer: dict[str, object]) -> set[tuple[str, str]]:
    sources = answer["sources"]
    assert isinstance(sources, list)
    return {(s["chunk_id"], s["text"]) for s in sources}


def test_two_workers_and_a_cli_ingest_serve_one_corpus(two_workers: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = two_workers
    _fresh(url, "/v1/documents", {"documents": DOCS[:1]})  # through one of the workers
    with ThreadPoolExecutor(4) as pool:
        found = list(
            pool.map(lambda _: _fresh(url, "/v1/search", {"query": "Eiffel Tower", "cache": "bypass"}), range(100))
        )
    assert all(r["hits"] and r["hits"][0]["doc_id"] == "paris" for r in found)  # type: ignore[index]
    _fresh(url, "/v1/documents", {"documents": DOCS[1:]})
    for _ in range(8):  # cached in both workers' L1 (and the shared L3)
        _fresh(url, "/v1/query", {"query": Q})
    # a CLI ingest into the live data dir changes the evidence of the cached answer
    newdocs = tmp_path / "newdocs"
    newdocs.mkdir()
    (newdocs / "paris.jsonl").write_text(
        '{"_id": "paris", "title": "Paris", "text": "The Eiffel Tower opened in March 1889 after two years of work."}\n'
        '{"_id": "owls", "title": "Owls", "text": "Owls hunt at night and swallow their prey whole."}\n'
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cli = [str(Path(sys.executable).parent / "ragline"), "ingest", str(newdocs), "--data-dir", str(tmp_path / "data")]
    done = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    stale = 0
    for _ in range(40):
        served = _fresh(url, "/v1/query", {"query": Q})
        fresh = _fresh(url, "/v1/query", {"query": Q, "cache": "bypass"})
        stale += _evidence(served) != _evidence(fresh)
        assert any("March" in text for _, text in _evidence(served))
    assert stale == 0
    hits = [_fresh(url, "/v1/search", {"query": "owls prey", "cache": "bypass"})["hits"] for _ in range(20)]
    assert all(h and h[0]["doc_id"] == "owls" for h in hits)  # type: ignore[index]
