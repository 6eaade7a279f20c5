"""ragline: a fast, cache-first retrieval-augmented generation server and library.

Public API: ``AsyncRAG`` (the async pipeline), ``RAG`` (its sync facade),
``Settings``, ``cached`` (users' functions on the same cache tiers), the value types and
the ``RaglineError`` tree.
"""

from ragline.cache.functions import cached, invalidate_function
from ragline.config import Settings
from ragline.errors import (
    ConfigError,
    Forbidden,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    RaglineError,
    RateLimited,
    ServiceUnavailable,
    StoreError,
    Unauthorized,
    UnsupportedFile,
    UpstreamError,
    UpstreamTimeout,
)
from ragline.facade import RAG
from ragline.pipeline import AsyncRAG
from ragline.types import Answer, CacheInfo, Chunk, Document, Hit, IngestReport, Usage

__version__ = "0.1.0"

__all__ = [
    "RAG",
    "Answer",
    "AsyncRAG",
    "CacheInfo",
    "Chunk",
    "ConfigError",
    "Document",
    "Forbidden",
    "Hit",
    "IngestReport",
    "InvalidInput",
    "NotFound",
    "PayloadTooLarge",
    "RaglineError",
    "RateLimited",
    "ServiceUnavailable",
    "Settings",
    "StoreError",
    "Unauthorized",
    "UnsupportedFile",
    "UpstreamError",
    "UpstreamTimeout",
    "Usage",
    "cached",
    "invalidate_function",
]
