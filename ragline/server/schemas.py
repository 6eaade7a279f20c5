"""Request bodies of the HTTP API (pydantic: documented at /docs, validated per field).

``QueryIn`` only documents ``POST /v1/query``: that route is the hot path and
parses its body by hand (see :mod:`ragline.server.routes`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

CACHE_MODES = ("default", "bypass", "refresh")


class _Strict(BaseModel):
    """No coercion: ``k: "5"`` or ``k: true`` are refused, as ``/v1/query`` refuses them."""

    model_config = ConfigDict(strict=True)


class DocumentIn(_Strict):
    id: str = Field(..., min_length=1, max_length=512)
    text: str
    title: str = ""
    metadata: dict[str, Any] = Field(default_factory=dict)


class DocumentsIn(_Strict):
    documents: list[DocumentIn] = Field(..., min_length=1)


class SearchIn(_Strict):
    query: str
    k: int = Field(10, ge=1)
    doc_level: bool = False
    mmr: bool = False
    timings: bool = False
    cache: Literal["default", "bypass", "refresh"] = "default"
    conversation_id: str | None = Field(
        None,
        description="keep the history server-side under this id (created on first use; GET/DELETE "
        "/v1/conversations/{id}); the question is condensed with it into a standalone one",
    )
    profile: bool | Literal["text", "html", "json"] | None = Field(
        None,
        description="operators only (an admin key; a tenant's key gets 403): return a pyinstrument profile "
        "and a tracemalloc summary of this request in the field 'profile'",
    )


class InvalidateIn(_Strict):
    """Exactly one of: ``all``, ``key``, ``tenant`` (optionally with ``doc_id``)."""

    tenant: str | None = None
    doc_id: str | None = None
    key: str | None = None
    all: bool = False


class QueryIn(BaseModel):
    """Schema of POST /v1/query (parsed by hand on the hot path)."""

    query: str
    k: int | None = Field(None, ge=1)
    stream: bool = False
    history: list[dict[str, str]] = Field(default_factory=list)
    timings: bool = True
    cache: Literal["default", "bypass", "refresh"] = "default"
    conversation_id: str | None = Field(
        None,
        description="keep the history server-side under this id (created on first use; GET/DELETE "
        "/v1/conversations/{id}); the question is condensed with it into a standalone one",
    )
    profile: bool | Literal["text", "html", "json"] | None = Field(
        None,
        description="operators only (an admin key; a tenant's key gets 403): return a pyinstrument profile "
        "and a tracemalloc summary of this request in the field 'profile'",
    )


QUERY_FIELDS = frozenset(QueryIn.model_fields)
"""The fields ``POST /v1/query`` takes; any other is a 400 (a misspelt field is not silently ignored)."""
