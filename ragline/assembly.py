"""Assembling a pipeline from settings: components from the plugin registry, the term clock from the
store's change log, the operator views that are not part of the query flow (``ragline.pipeline``)."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from ragline import metrics, plugins
from ragline.cache.clock import TermClock
from ragline.config import EmbedderSettings, Settings
from ragline.embed.base import Embedder
from ragline.embed.local import resolve_model_dir
from ragline.errors import ConfigError
from ragline.ingest.chunking import Chunker
from ragline.ingest.reembed import REEMBEDDING
from ragline.llm.base import LLM
from ragline.llm.cached import CachedLLM
from ragline.multiquery import EmbedFn, MultiQuery
from ragline.store.base import Store
from ragline.types import Message

log = logging.getLogger(__name__)

__all__ = [
    "build_embedder",
    "check_embedder",
    "load_components",
    "multi_query",
    "open_store",
    "term_clock",
    "update_gauges",
    "upstreams_of",
]


def multi_query(s: Settings, embed: EmbedFn, generate: Callable[[], CachedLLM | None]) -> MultiQuery | None:
    """The multi-query expander when ``retrieval.multi_query`` is on: LLM rephrasings through the LLM
    response cache when a generating LLM is configured, cheap rewrites with the extractive answerer."""
    if not s.retrieval.multi_query:
        return None

    async def complete(tenant: str, messages: list[Message]) -> str:
        llm = generate()
        assert llm is not None, "the pipeline is started before it retrieves"
        return (await llm.complete(tenant, messages)).text

    return MultiQuery(s.retrieval.multi_query_n, embed, complete if s.llm.provider != "extractive" else None)


def build_embedder(e: EmbedderSettings) -> Embedder:
    """The configured embedder; ``onnx`` without onnxruntime installed falls back to torch (``local``)."""
    if e.provider == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        if e.quantize != "none":
            raise ConfigError("embedder.quantize needs onnxruntime (pip install onnxruntime)")
        log.warning("onnxruntime is not installed: embedding with sentence-transformers on torch instead")
        return cast(Embedder, plugins.load("ragline.embedders", "local")(e))
    return cast(Embedder, plugins.load("ragline.embedders", e.provider)(e))


async def upstreams_of(component: object) -> dict[str, Any] | None:
    """A gateway-backed component's view of its upstreams; ``None`` for any other component."""
    snap = getattr(component, "upstreams", None)
    return await snap() if snap is not None else None


def term_clock(store: Store, window: int = 2048) -> TermClock:
    """The term clock as the store's change log has it: every term's last change, and the last
    ``window`` changes' removed and added chunks (an entry stamped before those is re-verified)."""
    recent = store.recent_changes(window)
    clock = TermClock(store.clock_rows(), floor=recent[0].seq - 1 if recent else 0)
    for change in recent:
        clock.record(change, store.vectors(change.tenant, list(change.added)) if change.added else None)
    return clock


def load_components(
    s: Settings, embedder: Embedder | None, store: Store | None, llm: LLM | None
) -> tuple[Embedder, Chunker, Store, LLM]:
    """The components not passed in, from the plugin registry, and the chunker."""
    emb = embedder if embedder is not None else build_embedder(s.embedder)
    tok = getattr(emb, "tokenizer_file", None)
    # Chunk with the embedder's own tokenizer; remote embedders fall back to MiniLM's.
    model_dir = Path(tok).parent if tok is not None else resolve_model_dir(EmbedderSettings().model)
    chunker = Chunker.from_model_dir(model_dir, s.chunk)
    if store is None:
        store = open_store(s, emb.dim)
    check_embedder(store, emb.id, s.embedder.model)
    if llm is None:
        llm = plugins.load("ragline.llms", s.llm.provider)(s.llm)
    return emb, chunker, store, llm


def open_store(s: Settings, dim: int) -> Store:
    """The configured store, from the plugin registry, for vectors of ``dim`` (no embedder check)."""
    factory = plugins.load("ragline.stores", s.store)
    opener = getattr(factory, "from_settings", None)  # built-ins read their own settings
    return cast(Store, opener(s, dim) if opener is not None else factory(s.data_dir, dim))


def check_embedder(store: Store, embedder_id: str, model: str) -> None:
    """Refuse a store whose vectors another embedder made (never mix two vector spaces silently).

    A store records the id of the embedder that wrote it (meta ``embedder``) when first opened empty.
    A store written before ragline recorded it is taken as sentence-transformers' (``st:<model>``),
    the only local embedder there was.  Stores without ``meta``/``set_meta`` (plugins) are not checked.
    """
    meta, set_meta = getattr(store, "meta", None), getattr(store, "set_meta", None)
    if meta is None or set_meta is None:
        return
    recorded = meta("embedder")
    if recorded is not None and recorded.startswith(REEMBEDDING):
        target = recorded.removeprefix(REEMBEDDING)
        where = getattr(store, "data_dir", "the PostgreSQL store")
        raise ConfigError(
            f"the store in {where} is being re-embedded with {target!r} (or a run was interrupted): "
            f"finish it with `ragline reembed` configured for that embedder before opening it"
        )
    if recorded is None:
        if store.stats()["chunks"] == 0 or not embedder_id.startswith("onnx"):
            set_meta("embedder", embedder_id)
            return
        recorded = f"st:{model}"
    if recorded != embedder_id:
        where = getattr(store, "data_dir", "the PostgreSQL store")
        hint = " (embedder.provider: local)" if recorded.startswith("st:") else ""
        if recorded.startswith("onnx"):
            hint = " (embedder.provider: onnx, embedder.quantize: " + (
                "int8)" if recorded.startswith("onnx-int8") else "none)"
            )
        raise ConfigError(
            f"the store in {where} holds vectors made by the embedder {recorded!r}, not by the configured "
            f"{embedder_id!r}: configure that embedder again{hint}, or re-embed the corpus with this one "
            "(`ragline reembed` with this configuration)"
        )


def update_gauges(store: Store | None) -> None:
    if store is not None:
        st = store.stats()
        metrics.DOCUMENTS.set(st["documents"])
        metrics.CHUNKS.set(st["chunks"])
