"""The cache keys a :class:`~ragline.cache.layer.CacheLayer` makes (a mixin: the layer class is at its
size limit).  Every key covers the tenant, the kind and the settings fingerprint; the answer key of a
history-free query is memoised by the query as sent, so the exact-hit path costs a dict lookup."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ragline.cache.keys import canonical_query, make_key_for

__all__ = ["LayerKeys"]

_MEMO_KEYS = 4096
_MEMO_QUERY_CHARS = 256


class LayerKeys:
    """Key construction over the layer's ``fingerprint``, ``embedder_id``, ``llm_id`` and memo."""

    fingerprint: str
    embedder_id: str
    llm_id: str
    _answer_keys: dict[tuple[str, str, int], str]

    def known_answer_key(self, tenant: str, query: object, k: object) -> str | None:
        """The memoised answer key of a history-free (tenant, query, k) seen before, else None."""
        try:
            return self._answer_keys.get((tenant, query, k))  # type: ignore[arg-type]
        except TypeError:  # an unhashable query or k: not one we have seen
            return None

    def answer_key(
        self, tenant: str, query: str, k: int, history: Sequence[dict[str, str]], canonical: str | None = None
    ) -> str:
        """The answer key of ``query`` as sent; ``canonical`` is its canonical form if the caller has it
        (validation computes it once per request), else it is computed here."""
        if not history:  # the hot path: a query asked again costs a dict lookup, not a hash
            memo = (tenant, query, k)
            key = self._answer_keys.get(memo)
            if key is None:
                q = canonical_query(query) if canonical is None else canonical
                key = make_key_for(tenant, "answer", {"q": q, "k": k, "fp": self.fingerprint})
                if len(query) <= _MEMO_QUERY_CHARS:
                    if len(self._answer_keys) >= _MEMO_KEYS:
                        self._answer_keys.clear()
                    self._answer_keys[memo] = key
            return key
        material: dict[str, Any] = {
            "q": canonical_query(query) if canonical is None else canonical,
            "k": k,
            "fp": self.fingerprint,
            "h": [[m["role"], m["content"]] for m in history],
        }
        return make_key_for(tenant, "answer", material)

    def retrieval_key(self, tenant: str, query: str, k: int, mmr: bool, doc_level: bool, candidates: int | None) -> str:
        return make_key_for(
            tenant,
            "retrieval",
            {"q": canonical_query(query), "k": k, "m": mmr, "d": doc_level, "c": candidates, "fp": self.fingerprint},
        )

    def embedding_key(self, tenant: str, text: str) -> str:
        return make_key_for(tenant, "embedding", {"e": self.embedder_id, "t": text})

    def llm_key(self, tenant: str, params: dict[str, Any], messages: list[dict[str, str]]) -> str:
        return make_key_for(tenant, "llm", {"llm": self.llm_id, "p": params, "m": messages})
