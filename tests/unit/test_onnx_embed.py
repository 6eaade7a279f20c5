"""The ONNX embedder's model-free parts: length buckets, pooling, the export cache, the store's
embedder record, and that importing it pulls in neither torch nor sentence-transformers."""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from ragline.assembly import check_embedder
from ragline.config import Settings
from ragline.embed import onnx_export
from ragline.embed.onnx import mean_pool, plan_batches
from ragline.errors import ConfigError


def test_plan_batches_covers_every_index_once_and_groups_similar_lengths() -> None:
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(3, 257, size=203)]
    batches = plan_batches(lengths, 16)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(203))
    assert all(1 <= len(b) <= 16 for b in batches)
    # sorted by length: every batch's rows are at least as long as the next batch's
    for a, b in itertools.pairwise(batches):
        assert min(lengths[i] for i in a) >= max(lengths[i] for i in b)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    naive = sum(min(16, 203 - s) * max(lengths[s : s + 16]) for s in range(0, 203, 16))
    assert padded < 0.75 * naive  # buckets pad far less than batching in input order


def test_plan_batches_token_cap() -> None:
    lengths = [256] * 8 + [8] * 40
    batches = plan_batches(lengths, 32, max_tokens=1024)
    assert all(len(b) * max(lengths[i] for i in b) <= 1024 for b in batches)
    assert [len(b) for b in batches[:2]] == [4, 4]
    assert plan_batches([], 8) == []
    assert plan_batches([5], 8) == [[0]]


def test_mean_pool_matches_sentence_transformers_definition() -> None:
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    out = mean_pool(hidden, mask)
    ref0 = hidden[0].mean(axis=0)
    ref1 = hidden[1, :2].mean(axis=0)
    np.testing.assert_allclose(out[0], ref0 / np.linalg.norm(ref0), rtol=1e-5)
    np.testing.assert_allclose(out[1], ref1 / np.linalg.norm(ref1), rtol=1e-5)
    assert np.all(out[2] == 0) and out.dtype == np.float32  # no tokens: zero, never NaN
    # padding never changes a row's vector
    wide = np.concatenate([hidden, rng.normal(size=(3, 3, 4)).astype(np.float32)], axis=1)
    np.testing.assert_allclose(mean_pool(wide, np.pad(mask, ((0, 0), (0, 3))))[:2], out[:2], rtol=1e-6)


def _model_dir(tmp: Path, weights: bytes = b"w" * 1000) -> Path:
    d = tmp / "model"
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.safetensors").write_bytes(weights)
    (d / "config.json").write_text("{}")
    return d


def test_export_runs_once_and_is_keyed_by_weights_and_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def fake_export(model_dir: Path, out: Path) -> None:
        calls.append(out)
        out.write_bytes(b"onnx:" + (model_dir / "model.safetensors").read_bytes()[:4])

    monkeypatch.setattr(onnx_export, "export", fake_export)
    root = tmp_path / "cache"
    md = _model_dir(tmp_path / "a")
    p1 = onnx_export.ensure_onnx(md, "none", root)
    p2 = onnx_export.ensure_onnx(md, "none", root)
    assert p1 == p2 and len(calls) == 1 and p1.read_bytes() == b"onnx:wwww"
    assert not [p for p in p1.parent.iterdir() if p.name.endswith(".tmp")]  # written by rename, no leftovers
    other = _model_dir(tmp_path / "b", b"v" * 1000)
    assert onnx_export.ensure_onnx(other, "none", root) != p1 and len(calls) == 2
    assert onnx_export.weights_key(md, "int8") != onnx_export.weights_key(md, "none")


def test_concurrent_first_use_exports_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    started = threading.Event()

    def slow_export(model_dir: Path, out: Path) -> None:
        calls.append(1)
        started.set()
        threading.Event().wait(0.2)
        out.write_bytes(b"x")

    monkeypatch.setattr(onnx_export, "export", slow_export)
    md = _model_dir(tmp_path)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(onnx_export.ensure_onnx(md, "none", tmp_path / "c")))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1


def test_cache_root_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RAGLINE_CACHE_DIR", str(tmp_path))
    assert onnx_export.cache_root() == tmp_path / "onnx"
    monkeypatch.delenv("RAGLINE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert onnx_export.cache_root() == tmp_path / "x" / "ragline" / "onnx"


class _Store:
    def __init__(self, chunks: int, recorded: str | None = None) -> None:
        self._meta = {} if recorded is None else {"embedder": recorded}
        self.chunks = chunks

    def meta(self, key: str) -> str | None:
        return self._meta.get(key)

    def set_meta(self, key: str, value: str) -> None:
        self._meta[key] = value

    def stats(self) -> dict[str, int]:
        return {"chunks": self.chunks, "documents": self.chunks}


def test_store_records_its_embedder_and_refuses_another() -> None:
    st = _Store(0)
    check_embedder(st, "onnx:m", "m")  # type: ignore[arg-type]
    assert st.meta("embedder") == "onnx:m"
    check_embedder(st, "onnx:m", "m")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"onnx-int8:m.*embedder.provider: onnx, embedder.quantize: none"):
        check_embedder(st, "onnx-int8:m", "m")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="st:m"):
        check_embedder(st, "st:m", "m")  # type: ignore[arg-type]


def test_store_from_before_the_record_is_taken_as_torch() -> None:
    with pytest.raises(ConfigError, match=r"'st:m'.*embedder.provider: local"):
        check_embedder(_Store(5), "onnx:m", "m")  # type: ignore[arg-type]
    legacy = _Store(5)
    check_embedder(legacy, "st:m", "m")  # type: ignore[arg-type]
    assert legacy.meta("embedder") == "st:m"


def test_settings_default_and_fingerprint() -> None:
    s = Settings()
    assert s.embedder.provider == "onnx" and s.embedder.quantize == "none"
    q = Settings(embedder={"quantize": "int8"})
    assert q.fingerprint() != s.fingerprint()
    assert Settings(embedder={"provider": "local"}).fingerprint() != s.fingerprint()
    with pytest.raises(ValueError):
        Settings(embedder={"quantize": "int4"})


def test_importing_the_onnx_embedder_does_not_import_torch() -> None:
    code = (
        "import sys, ragline.embed.onnx, ragline.server.app; "
        "print('torch' in sys.modules, 'sentence_transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_serve_announces_only_once_the_port_answers(capsys: pytest.CaptureFixture[str]) -> None:
    import http.server
    import socket
    import time

    from ragline.cli.serve import _announce_when_serving

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _announce_when_serving("127.0.0.1", port, "ragline serving TEST")
    time.sleep(0.3)
    assert "ragline serving TEST" not in capsys.readouterr().err  # nothing listens yet: no claim

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.HTTPServer(("127.0.0.1", port), Ok)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        deadline = time.monotonic() + 5
        seen = ""
        while "ragline serving TEST" not in seen and time.monotonic() < deadline:
            time.sleep(0.05)
            seen += capsys.readouterr().err
        assert "ragline serving TEST" in seen
    finally:
        srv.shutdown()
