"""ONNX Runtime embedder (``embedder.provider: onnx``, the default): the packaged MiniLM without torch.

The model is the same installed package the torch embedder loads (``resolve_model_dir``), exported
to ONNX once at first use (:mod:`ragline.embed.onnx_export`, cached on disk).  After that a process
imports neither torch nor sentence-transformers: ONNX Runtime, ``tokenizers`` and numpy load in a
fraction of a second, and a short query embeds in a few milliseconds instead of 13-18 ms.

The vectors are sentence-transformers' own: texts stripped, tokenised with the model's
``tokenizer.json`` truncated to its ``max_seq_length``, mean pooling over the attention mask, L2
normalisation (benchmarks/onnx_embedder.py checks the parity).  Batches are planned by length
buckets (:func:`plan_batches`): texts sorted by token count and cut into batches of similar length,
each padded only to its own longest text, so a short chunk never pays for a long one.

``embedder.quantize: int8`` runs a dynamically quantised copy (faster, slightly different vectors:
its own embedder id, so its caches and stores are its own).  Without onnxruntime installed,
:func:`ragline.assembly.build_embedder` falls back to the torch embedder.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ragline.config import EmbedderSettings
from ragline.embed.local import resolve_model_dir
from ragline.types import Vectors

__all__ = ["OnnxEmbedder", "mean_pool", "plan_batches"]

log = logging.getLogger("ragline.embed.onnx")


def plan_batches(lengths: list[int], batch_size: int, max_tokens: int = 0) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches of similar length (longest first).

    Sorting by length then cutting keeps the padding of each batch small; ``max_tokens`` (if set)
    additionally caps a batch's padded size (rows x its longest row), so a batch of long texts is
    smaller than one of short texts.  Every index appears exactly once.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = lengths[cur[0]] if cur else lengths[i]
        if cur and (len(cur) >= batch_size or (max_tokens and (len(cur) + 1) * longest > max_tokens)):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def mean_pool(hidden: Any, mask: Any) -> Vectors:
    """sentence-transformers' mean pooling and normalisation: the mask-weighted mean of the token
    vectors (a row without tokens stays zero), then L2-normalised (epsilon 1e-12, as torch's)."""
    m = mask.astype(np.float32)[:, :, None]
    summed = (hidden * m).sum(axis=1)
    counts = np.maximum(m.sum(axis=1), 1e-9)
    pooled = summed / counts
    norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    out: Vectors = np.ascontiguousarray(pooled / norms, dtype=np.float32)
    return out


def _max_seq_length(model_dir: Path) -> int:
    p = model_dir / "sentence_bert_config.json"
    if p.is_file():
        v = orjson.loads(p.read_bytes()).get("max_seq_length")
        if isinstance(v, int) and v > 0:
            return v
    return 256


class OnnxEmbedder:
    """ONNX Runtime on the CPU; vectors are L2-normalised float32, like ``LocalEmbedder``'s.

    Thread-safe: a lock serialises ``embed`` calls (one pass at a time uses every thread the
    session has; the micro-batcher merges concurrent requests instead).
    """

    def __init__(self, settings: EmbedderSettings, *, cache_dir: Path | None = None) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import onnxruntime as ort
        from tokenizers import Tokenizer

        from ragline.embed.onnx_export import ensure_onnx

        self.model_dir = resolve_model_dir(settings.model)
        self.quantize = settings.quantize
        self.onnx_path = ensure_onnx(self.model_dir, self.quantize, cache_dir)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = settings.threads  # 0: ONNX Runtime's default, one per physical core
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spin inside a pass, never between passes.  The intra-op threads meet at every operator; waking a
        # sleeping thread at each of them costs 0.7 ms of a 3.4 ms query (fp32, 2 threads: 2.6 ms spinning).
        # But threads left spinning after a pass starve the event loop, tokenisation and the other worker
        # on a small machine (tenant B's one-document ingest behind A's job: 2.8 s vs 2.0 s, see NOTES), so
        # ``force_spinning_stop`` parks them when each pass ends: one query every 5 ms costs 0.77 CPU per
        # second of wall time this way, 1.39 when they keep spinning (docs/NOTES.md, "Spin inside a pass").
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self._session: Any = ort.InferenceSession(str(self.onnx_path), opts, providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self._session.get_inputs()}
        self.max_seq_length = _max_seq_length(self.model_dir)
        tok = Tokenizer.from_file(str(self.tokenizer_file))
        tok.no_padding()
        tok.enable_truncation(self.max_seq_length)
        self._tok = tok
        self.batch_size = settings.batch_size
        self.max_tokens = settings.max_batch_tokens
        name = self.model_dir.name if self.model_dir.name != "model" else settings.model
        self.id = f"onnx:{name}" if self.quantize == "none" else f"onnx-{self.quantize}:{name}"
        self._lock = threading.Lock()
        self.calls = 0
        """Number of ``embed`` calls that reached the model (tests count these)."""
        self.texts_embedded = 0
        self.dim: int = int(self._run([[101, 102]])[0].shape[0])

    @property
    def tokenizer_file(self) -> Path:
        return self.model_dir / "tokenizer.json"

    def _run(self, ids: list[list[int]]) -> Vectors:
        """One forward pass over token id rows of any lengths (padded here to the longest)."""
        n, width = len(ids), max(len(r) for r in ids)
        input_ids = np.zeros((n, width), dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        for j, row in enumerate(ids):
            input_ids[j, : len(row)] = row
            mask[j, : len(row)] = 1
        feed = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feed["token_type_ids"] = np.zeros_like(input_ids)
        hidden = self._session.run(None, feed)[0]
        return mean_pool(hidden, mask)

    def embed(self, texts: list[str]) -> Vectors:
        if not texts:
            return np.zeros((0, getattr(self, "dim", 0)), dtype=np.float32)
        encs = self._tok.encode_batch([t.strip() for t in texts], add_special_tokens=True)
        ids = [e.ids for e in encs]
        with self._lock:
            self.calls += 1
            self.texts_embedded += len(texts)
            if len(ids) == 1:
                return self._run(ids)
            out = np.empty((len(ids), self.dim), dtype=np.float32)
            for batch in plan_batches([len(r) for r in ids], self.batch_size, self.max_tokens):
                out[batch] = self._run([ids[i] for i in batch])
        return out
