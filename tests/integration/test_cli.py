"""The CLI drives the same pipeline: ingest → search → ask → delete, and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from ragline.cli import app

DOC = (
    '{"_id": "d1", "title": "Paris", "text": "Paris is the capital of France. The Eiffel Tower opened in 1889."}\n'
    '{"_id": "d2", "title": "Cats", "text": "Domestic cats sleep for sixteen hours a day."}\n'
)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    d = tmp_path / "docs"
    d.mkdir()
    (d / "corpus.jsonl").write_text(DOC)
    (d / "notes.md").write_text("# Tantivy\n\nTantivy is a full-text search engine library written in Rust.\n")
    return d


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_ingest_search_ask_delete(corpus: Path, tmp_path: Path) -> None:
    dd = ["--data-dir", str(tmp_path / "data")]
    code, out, _ = run("ingest", str(corpus), *dd)
    assert code == 0, out
    assert "3 documents: 3 added" in out
    code, out, _ = run("ingest", str(corpus), *dd, "--json")
    assert code == 0 and orjson.loads(out)["unchanged"] == 3
    code, out, _ = run("search", "full-text search in Rust", "-k", "2", "--json", *dd)
    assert code == 0
    hits = orjson.loads(out)["hits"]
    assert hits[0]["doc_id"] == "notes.md" and hits[0]["dense_rank"] is not None
    code, out, _ = run("search", "Eiffel", *dd)
    assert code == 0 and "d1" in out
    code, out, _ = run("ask", "When did the Eiffel Tower open?", "--json", *dd)
    assert code == 0
    body = orjson.loads(out)
    assert "1889" in body["answer"] and body["sources"][0]["doc_id"] == "d1"
    code, out, _ = run("delete", "d1", *dd)
    assert code == 0 and "1 chunks" in out
    code, _, err = run("delete", "d1", *dd)
    assert code == 2 and "no document with id 'd1'" in err


def test_errors_are_one_line_and_exit_2(corpus: Path, tmp_path: Path) -> None:
    dd = ["--data-dir", str(tmp_path / "data")]
    code, _, err = run("ingest", str(tmp_path / "missing"), *dd)
    assert code == 2 and "no such file" in err
    bad = tmp_path / "x.xyz"
    bad.write_text("hello")
    code, _, err = run("ingest", str(bad), *dd)
    assert code == 2 and "unsupported" in err.lower() and len(err.strip().splitlines()) == 1
    code, _, err = run("search", "   ", *dd)
    assert code == 2 and "query is empty" in err
    code, _, err = run("search", "x", "-k", "0", *dd)
    assert code == 2 and "k must be" in err
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("chunk:\n  size: -1\n")
    code, _, err = run("search", "x", "--config", str(cfg), *dd)
    assert code == 2 and "chunk.size" in err


def test_console_script_entry_point(corpus: Path, tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("ragline")
    env = {**os.environ, "RAGLINE_DATA_DIR": str(tmp_path / "data")}
    r = subprocess.run(
        [str(exe), "ingest", str(corpus / "notes.md")], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "1 added" in r.stdout
