"""Semantic answer cache: a candidate generator, never the judge (DESIGN.md §3.2).

One usearch index per (tenant, pipeline fingerprint) over the vectors of
queries whose answers are cached.  ``candidates`` returns cached queries with
cosine ≥ a floor (cosine of L2-normalised vectors, 0–1 scale) and their
vectors; the caller must then pass the accept decision
(``ragline.cache.semantic_decision``) and retrieval verification (the cached
answer's evidence in this query's fresh context) before serving one.  Partitioning by tenant in separate
indexes means no query can even *see* another tenant's candidates.

The index is in-process (per instance) and is rebuilt from the dependency
index at start-up, which holds every cached query's vector and text.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

import ragline.infra.native  # noqa: F401  # isort: skip  (loaded before usearch: see that module)
from usearch.index import Index

from ragline.types import Vectors


@dataclass(frozen=True, slots=True)
class Candidate:
    answer_key: str
    query: str
    similarity: float
    vector: Vectors | None = None
    """The cached query's vector (the decision's embedding features), when the index returns it."""


class SemanticIndex:
    def __init__(self, dim: int, max_entries: int = 100_000) -> None:
        self.dim = dim
        self.max_entries = max_entries
        self._indexes: dict[tuple[str, str], Index] = {}
        self._entries: dict[int, tuple[tuple[str, str], str, str]] = {}
        self._by_key: dict[str, int] = {}
        self._next = 1
        self._lock = threading.Lock()

    def add(self, tenant: str, fingerprint: str, answer_key: str, query: str, qvec: Vectors) -> None:
        with self._lock:
            if answer_key in self._by_key:
                return
            if len(self._entries) >= self.max_entries:
                self._remove_locked(next(iter(self._by_key)))  # oldest first
            part = (tenant, fingerprint)
            idx = self._indexes.get(part)
            if idx is None:
                idx = self._indexes[part] = Index(ndim=self.dim, metric="cos", dtype="f32")
            label = self._next
            self._next += 1
            idx.add(label, np.ascontiguousarray(qvec, dtype=np.float32).reshape(-1))
            self._entries[label] = (part, answer_key, query)
            self._by_key[answer_key] = label

    def candidates(self, tenant: str, fingerprint: str, qvec: Vectors, threshold: float, n: int = 3) -> list[Candidate]:
        with self._lock:
            idx = self._indexes.get((tenant, fingerprint))
            if idx is None or len(idx) == 0:
                return []
            m = idx.search(np.ascontiguousarray(qvec, dtype=np.float32).reshape(-1), min(n, len(idx)), threads=1)
            out = []
            for label, dist in zip(m.keys, m.distances, strict=False):
                sim = 1.0 - float(dist)
                entry = self._entries.get(int(label))
                if entry is not None and sim >= threshold:
                    vec = idx.get(int(label))
                    out.append(Candidate(entry[1], entry[2], min(sim, 1.0), None if vec is None else np.asarray(vec)))
            return out

    def _remove_locked(self, answer_key: str) -> None:
        label = self._by_key.pop(answer_key, None)
        if label is None:
            return
        part, _, _ = self._entries.pop(label)
        idx = self._indexes.get(part)
        if idx is not None:
            idx.remove(label)

    def remove(self, answer_keys: list[str] | set[str]) -> None:
        with self._lock:
            for k in answer_keys:
                self._remove_locked(k)

    def clear(self, tenant: str | None = None) -> None:
        with self._lock:
            if tenant is None:
                self._indexes.clear()
                self._entries.clear()
                self._by_key.clear()
                return
            for k in [k for k, lab in self._by_key.items() if self._entries[lab][0][0] == tenant]:
                self._remove_locked(k)

    def __len__(self) -> int:
        return len(self._entries)
