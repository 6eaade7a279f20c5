"""Value types shared by every layer.

Frozen, slotted dataclasses: cheap to build on the hot path, hashable where it
matters, and serialised with ``to_dict`` (plain dicts for orjson) rather than
through pydantic, so that the cache and the server never pay for validation of
data ragline produced itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

DEFAULT_TENANT = "default"

Json = dict[str, Any]

Vectors = npt.NDArray[np.float32]
"""L2-normalised float32 vectors, shape (n, dim)."""

Message = dict[str, str]
"""An OpenAI chat message: {"role": "system"|"user"|"assistant", "content": str}."""


@dataclass(frozen=True, slots=True)
class Scored:
    """A chunk id and a retriever's raw score (cosine for dense, BM25 for keyword)."""

    chunk_id: str
    score: float


@dataclass(frozen=True, slots=True)
class Document:
    """A user document before chunking; ``id`` is the user's stable id."""

    id: str
    text: str
    title: str = ""
    metadata: Json = field(default_factory=dict)
    source: str = ""


@dataclass(frozen=True, slots=True)
class Chunk:
    """A token-bounded piece of a document; ``id`` is ``{doc_id}#{ordinal}``.

    ``content_hash`` is the blake2b of the chunk text and title: the key of the
    embedding cache and of dedupe.
    """

    id: str
    doc_id: str
    ordinal: int
    text: str
    title: str
    content_hash: str
    metadata: Json = field(default_factory=dict)

    @property
    def index_text(self) -> str:
        """The text that is embedded and keyword-indexed (title gives context)."""
        return f"{self.title}\n{self.text}" if self.title else self.text


@dataclass(frozen=True, slots=True)
class Change:
    """One committed corpus change, as every process serving the corpus learns of it.

    The store's change log holds one per ``upsert`` or ``delete``; ``seq`` orders them across
    tenants and processes.  ``removed`` and ``added`` name only chunks whose content changed: a
    replacing chunk with the same id, text, title and metadata is no change to any retrieval.
    ``terms`` are the keyword terms of every removed and added chunk (their idf moved)."""

    seq: int
    tenant: str
    removed: tuple[str, ...]
    added: tuple[str, ...]
    terms: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Hit:
    """One retrieved chunk with its fused score and per-retriever rank/score.

    ``dense_rank``/``keyword_rank`` are 1-based and ``None`` when that retriever
    did not return the chunk within its candidate depth.
    """

    chunk_id: str
    doc_id: str
    text: str
    score: float
    title: str = ""
    dense_rank: int | None = None
    dense_score: float | None = None
    keyword_rank: int | None = None
    keyword_score: float | None = None
    metadata: Json = field(default_factory=dict)

    def to_dict(self) -> Json:
        # field by field: dataclasses.asdict deep-copies recursively (measured ~0.7 ms for a retrieval's hits)
        return {
            "chunk_id": self.chunk_id,
            "doc_id": self.doc_id,
            "text": self.text,
            "score": self.score,
            "title": self.title,
            "dense_rank": self.dense_rank,
            "dense_score": self.dense_score,
            "keyword_rank": self.keyword_rank,
            "keyword_score": self.keyword_score,
            "metadata": self.metadata,
        }


@dataclass(frozen=True, slots=True)
class Usage:
    """Token accounting of one generation."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> Json:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


CacheKind = Literal["miss", "exact", "semantic", "bypass"]


@dataclass(frozen=True, slots=True)
class CacheInfo:
    """How an answer was served: a miss, an exact hit (and from which tier) or a semantic hit."""

    kind: CacheKind = "miss"
    tier: str | None = None
    similarity: float | None = None
    matched_query: str | None = None

    def to_dict(self) -> Json:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Answer:
    """A generated answer; ``sources`` are numbered 1..n as cited in ``text``."""

    text: str
    sources: tuple[Hit, ...]
    usage: Usage = Usage()
    timings: dict[str, float] = field(default_factory=dict)
    cache: CacheInfo = CacheInfo()
    model: str = ""
    upstream: str = ""
    """The gateway upstream that generated it (empty without a gateway)."""

    def to_dict(self, timings: bool = True) -> Json:
        out: Json = {
            "answer": self.text,
            "sources": [h.to_dict() for h in self.sources],
            "usage": self.usage.to_dict(),
            "model": self.model,
            "cache": self.cache.to_dict(),
        }
        if self.upstream:
            out["upstream"] = self.upstream
        if timings:
            out["timings"] = self.timings
        return out


@dataclass(frozen=True, slots=True)
class IngestReport:
    """What one ingest call did: counts per outcome, for progress and the API."""

    documents: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    chunks_added: int = 0
    chunks_removed: int = 0
    chunks_embedded: int = 0
    errors: tuple[str, ...] = ()

    def to_dict(self) -> Json:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Retrieval:
    """Fused hits plus what a cache entry needs to know to be invalidated correctly."""

    hits: list[Hit]
    dense_cutoff: float | None = None
    """Cosine of the dense retriever's last candidate (None: fewer than asked)."""
    keyword_cutoff: float | None = None
    """BM25 score of the keyword retriever's last candidate (None: fewer than asked)."""
    candidate_ids: tuple[str, ...] = field(default_factory=tuple)
    vectors: Vectors | None = field(default=None, compare=False, repr=False)
    """The hits' vectors in hit order when retrieval fetched them (for MMR): the context's
    near-duplicate check reuses them instead of reading them again.  Never stored in a cache."""


CacheMode = Literal["default", "bypass", "refresh"]
"""``default`` reads and writes every cache; ``refresh`` recomputes and overwrites the answer and
LLM response (retrieval and embeddings still come from their caches); ``bypass`` neither reads nor
writes the answer, retrieval and LLM caches."""


@dataclass(frozen=True, slots=True)
class Query:
    """One request to the pipeline: what to answer (or search) and how.

    Built once per request by the public methods (their keyword arguments are
    thin adapters over it) and passed unchanged through every step; the
    pipeline validates it (``k`` resolved, ``history`` checked) before use.
    """

    text: str
    k: int | None = None
    """Chunks to retrieve; ``None``: the configured ``retrieval.k``."""
    tenant: str = DEFAULT_TENANT
    history: tuple[Message, ...] = ()
    """Earlier turns of the conversation, oldest first (user/assistant messages)."""
    cache_mode: CacheMode = "default"
    timings: bool = True
    """Record per-stage timings for the response (the stage histograms are always recorded)."""
    doc_level: bool = False
    """Search only: the best chunk per document."""
    mmr: bool | None = None
    """Diversify with MMR; ``None``: the configured ``retrieval.mmr``."""
    candidates: int | None = None
    """Candidates per retriever; ``None``: the configured ``retrieval.candidates``."""
    raw: str = ""
    """The query as sent (``text`` is its :func:`~ragline.canonical.query_form`); memoises its key."""
    canonical: str = ""
    """The exact-key material (:func:`~ragline.canonical.canonical`), computed once by validation."""
