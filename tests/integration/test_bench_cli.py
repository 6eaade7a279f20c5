"""``ragline bench`` end to end: the console script against a real running server, and in-process
against a data dir.  Both bounded to a few seconds; nothing here reads ../shared."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from typer.testing import CliRunner

from ragline.cli import app
from ragline.config import Settings
from ragline.pipeline import AsyncRAG
from ragline.server.app import create_app
from ragline.testing import HashEmbedder, ScriptedLLM
from tests.fixtures.http import ThreadedServer

KEY = "bench-key-0123"
DOCS = {
    "documents": [
        {"id": "paris", "title": "Paris", "text": "Paris is the capital of France. The Eiffel Tower opened in 1889."},
        {"id": "cats", "title": "Cats", "text": "Domestic cats sleep for sixteen hours a day."},
        {"id": "tea", "title": "Tea", "text": "Green tea contains caffeine and antioxidants called catechins."},
    ]
}
QUERIES = "When did the Eiffel Tower open?\nHow long do cats sleep?\nWhat does green tea contain?\n"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ThreadedServer, ScriptedLLM]]:
    """A real HTTP server (API key required) over fast fake components, with three documents."""
    llm = ScriptedLLM()
    settings = Settings(
        data_dir=tmp_path / "data",
        cache={"enabled": True, "redis_url": None},
        server={"api_keys": {KEY: "t1"}, "require_api_key": True},
    )
    with ThreadedServer(create_app(settings, AsyncRAG(settings, embedder=HashEmbedder(), llm=llm))) as srv:
        r = httpx.post(
            f"{srv.url}/v1/documents",
            json=DOCS,
            headers={"authorization": f"Bearer {KEY}"},
            timeout=30,
            trust_env=False,
        )
        assert r.status_code == 200, r.text
        yield srv, llm


def bench_cmd(*args: str) -> list[str]:
    exe = Path(sys.executable).with_name("ragline")
    return [str(exe), "bench", *args]


def test_bench_url_against_a_running_server(server: tuple[ThreadedServer, ScriptedLLM], tmp_path: Path) -> None:
    srv, llm = server
    queries = tmp_path / "queries.txt"
    queries.write_text(QUERIES)
    out, png = tmp_path / "report.json", tmp_path / "report.png"
    env = {**os.environ, "RAGLINE_BENCH_API_KEY": KEY}
    r = subprocess.run(
        bench_cmd(
            "--url",
            srv.url,
            "--queries",
            str(queries),
            "--concurrency",
            "4",
            "--duration",
            "3",
            "--requests",
            "300",
            "--out",
            str(out),
            "--png",
            str(png),
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    rep = orjson.loads(out.read_bytes())
    assert rep["duration_s"] <= 3 + 30 + 5  # hard bound by construction: duration + request timeout + grace
    assert rep["mode"] == "http" and rep["target"] == srv.url
    assert 0 < rep["requests"] <= 300 and rep["stopped_by"] in ("count", "time")
    assert rep["status"] == {"200": rep["requests"]} and rep["errors"] == 0
    assert rep["rps"] > 0 and 0 < rep["latency_ms"]["p50"] <= rep["latency_ms"]["p99"]
    kinds = rep["cache"]["kinds"]
    assert sum(kinds.values()) == rep["requests"]
    # three distinct queries: at most one miss each (single-flight followers report the leader's miss)
    assert llm.calls <= 3 and kinds.get("exact", 0) >= rep["requests"] - 3 * 4
    assert rep["cache"]["hit_rate"] == round(rep["cache"]["hits"] / rep["requests"], 4)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "req/s" in r.stderr and "cache hit rate" in r.stderr


def test_bench_url_without_the_api_key_reports_401s(server: tuple[ThreadedServer, ScriptedLLM], tmp_path: Path) -> None:
    srv, llm = server
    queries = tmp_path / "queries.txt"
    queries.write_text(QUERIES)
    env = {k: v for k, v in os.environ.items() if k != "RAGLINE_BENCH_API_KEY"}
    r = subprocess.run(
        bench_cmd("--url", srv.url, "--queries", str(queries), "--requests", "5"),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and "no request succeeded" in r.stderr
    rep = orjson.loads(r.stdout)
    assert rep["status"] == {"401": 5} and rep["ok"] == 0 and llm.calls == 0


@pytest.mark.slow
def test_bench_data_dir_in_process(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "corpus.jsonl").write_text(
        "".join(
            orjson.dumps({"_id": d["id"], "title": d["title"], "text": d["text"]}).decode() + "\n"
            for d in DOCS["documents"]
        )
    )
    dd = ["--data-dir", str(tmp_path / "data")]
    ingest = CliRunner().invoke(app, ["ingest", str(docs), *dd])
    assert ingest.exit_code == 0, ingest.stderr
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(orjson.dumps({"query": q}).decode() + "\n" for q in QUERIES.splitlines()))
    res = CliRunner().invoke(
        app, ["bench", *dd, "--queries", str(queries), "--requests", "30", "--duration", "20", "--concurrency", "2"]
    )
    assert res.exit_code == 0, res.stderr
    rep = orjson.loads(res.stdout)
    assert rep["mode"] == "in_process" and rep["target"] == str(tmp_path / "data")
    assert rep["requests"] == 30 or rep["stopped_by"] == "time"
    assert rep["status"] == {"200": rep["requests"]}
    assert rep["cache"]["hits"] >= rep["requests"] - 3 * 2 and rep["cache"]["kinds"].get("exact", 0) > 0
