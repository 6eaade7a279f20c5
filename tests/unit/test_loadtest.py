"""ragline.loadtest and ``ragline bench``: bounds, the report, and one-line errors (no model, no server)."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import orjson
import pytest
from typer.testing import CliRunner

from ragline import loadtest
from ragline.cli import app
from ragline.config import Settings
from ragline.pipeline import AsyncRAG
from ragline.testing import HashEmbedder, ScriptedLLM
from ragline.types import Document


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_read_queries_text_and_jsonl(tmp_path: Path) -> None:
    txt = tmp_path / "q.txt"
    txt.write_text("what is BM25?\n\n  how do caches work?  \n")
    assert loadtest.read_queries(txt) == ["what is BM25?", "how do caches work?"]
    jl = tmp_path / "q.jsonl"
    jl.write_text('{"_id": "1", "text": "a claim"}\n{"query": "a question"}\n')
    assert loadtest.read_queries(jl) == ["a claim", "a question"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no queries"):
        loadtest.read_queries(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="not found"):
        loadtest.read_queries(tmp_path / "missing.txt")
    (tmp_path / "bad.jsonl").write_text('{"nope": 1}\n')
    with pytest.raises(ValueError, match="line 1"):
        loadtest.read_queries(tmp_path / "bad.jsonl")


def test_bench_config_and_url_checks() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        loadtest.BenchConfig(concurrency=0).check()
    with pytest.raises(ValueError, match="max requests"):
        loadtest.BenchConfig(max_requests=0).check()
    with pytest.raises(ValueError, match="duration"):
        loadtest.BenchConfig(duration_s=0).check()
    assert loadtest.check_url("http://127.0.0.1:8080/") == "http://127.0.0.1:8080"
    for bad in ("ftp://x", "127.0.0.1:8080", "not a url"):
        with pytest.raises(ValueError):
            loadtest.check_url(bad)


async def test_bench_pipeline_counts_hits_and_respects_the_request_bound(tmp_path: Path) -> None:
    llm = ScriptedLLM()
    settings = Settings(data_dir=tmp_path / "d", cache={"enabled": True, "redis_url": None})
    async with AsyncRAG(settings, embedder=HashEmbedder(), llm=llm) as rag:
        await rag.ingest([Document("paris", "The Eiffel Tower opened in 1889.", "Paris")])
        cfg = loadtest.BenchConfig(concurrency=1, max_requests=20, duration_s=30)  # 1: exact counts
        rep = await loadtest.bench_pipeline(rag, ["When did the Eiffel Tower open?", "   "], cfg)
    assert rep["mode"] == "in_process" and rep["stopped_by"] == "count"
    assert rep["requests"] == 20 and rep["ok"] == 10 and rep["errors"] == 10
    assert rep["status"] == {"200": 10, "400": 10}  # the blank query is bad input, counted not raised
    assert rep["error_kinds"] == {"invalid_input": 10}
    assert rep["cache"]["kinds"] == {"exact": 9, "miss": 1} and rep["cache"]["hit_rate"] == 0.9
    assert llm.calls == 1
    assert 0 < rep["latency_ms"]["p50"] <= rep["latency_ms"]["p99"] <= rep["latency_ms"]["max"]


async def test_bench_url_against_an_in_process_app_counts_statuses() -> None:
    hits = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal hits
        body = orjson.loads(request.content)
        if body["query"] == "boom":
            return httpx.Response(503, json={"error": {"code": "unavailable", "message": "x"}})
        hits += 1
        kind = "miss" if hits == 1 else "exact"
        return httpx.Response(200, json={"answer": "a", "sources": [], "cache": {"kind": kind}})

    orig = httpx.AsyncClient.__init__

    def patched(self: httpx.AsyncClient, *a: object, **kw: object) -> None:
        kw["transport"] = httpx.MockTransport(handler)
        orig(self, *a, **kw)  # type: ignore[arg-type]

    mp = pytest.MonkeyPatch()
    mp.setattr(httpx.AsyncClient, "__init__", patched)
    try:
        rep = await loadtest.bench_url(
            "http://ragline.test",
            ["q1", "q2", "boom"],
            loadtest.BenchConfig(concurrency=3, max_requests=9, api_key="k"),
        )
    finally:
        mp.undo()
    assert rep["requests"] == 9 and rep["status"] == {"200": 6, "503": 3}
    assert rep["cache"] == {"hit_rate": 0.8333, "hits": 5, "kinds": {"exact": 5, "miss": 1}}


def test_cli_bench_bad_input_is_one_line_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    q = tmp_path / "q.txt"
    q.write_text("hello\n")
    (tmp_path / "empty.txt").write_text("")
    url = ["--url", "http://127.0.0.1:9"]
    cases = [
        (["--queries", str(tmp_path / "missing.txt"), *url], "queries file not found"),
        (["--queries", str(tmp_path / "empty.txt"), *url], "no queries"),
        (["--queries", str(q), "--concurrency", "0", *url], "concurrency must be >= 1"),
        (["--queries", str(q)], "exactly one of --url"),
        (["--queries", str(q), *url, "--data-dir", str(tmp_path)], "exactly one of --url"),
        (["--queries", str(q), "--url", "localhost:8080"], "http(s)://"),
        (["--queries", str(q), "--data-dir", str(tmp_path / "nope")], "data dir not found"),
    ]
    for args, needle in cases:
        code, _, err = run("bench", *args)
        assert code == 2, (args, err)
        assert needle in err and len(err.strip().splitlines()) == 1, (args, err)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed
    code, _, err = run("bench", "--queries", str(q), *url, "--png", str(tmp_path / "x.png"))
    assert code == 2 and "--png needs matplotlib" in err and len(err.strip().splitlines()) == 1


def test_cli_bench_unreachable_server_reports_and_exits_1(tmp_path: Path) -> None:
    q = tmp_path / "q.txt"
    q.write_text("hello\n")
    out = tmp_path / "r.json"
    code, _, err = run(
        "bench",
        "--queries",
        str(q),
        "--url",
        "http://127.0.0.1:9",
        "--requests",
        "3",
        "--duration",
        "5",
        "--out",
        str(out),
    )
    assert code == 1 and "no request succeeded" in err
    rep = orjson.loads(out.read_bytes())
    assert rep["requests"] == 3 and rep["ok"] == 0 and rep["error_kinds"] == {"ConnectError": 3}
