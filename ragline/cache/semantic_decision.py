"""The semantic cache's accept decision: a small calibrated model over signals already computed.

May the answer cached for query *b* serve query *a*?  The ANN index proposes *b* (cosine ≥
``semantic_min_cosine``); this module decides, in microseconds and pure numpy:

1. **Signals** (:data:`SIGNALS`): the cosine; every guard of :mod:`ragline.cache.guards` as a 0/1
   feature (not a veto); the structure checks of :mod:`ragline.cache.guards_structure` (antonym swap,
   negation moved, one-sided modality, deictic pronoun); lexical alignment (Jaccard of content words
   and of all words, count of differing content words, length ratio, entity and number differences).
2. **Embedding interaction** (optional): ``u ⊙ v`` and ``|u − v|`` of the two query vectors (the
   classic pair features of sentence-embedding classifiers).  The file holds a model with them and
   one without; the fit keeps the one with them only if it does better on the validation pairs
   (``use_vectors``).  On MiniLM it did not, so the shipped decision is signals-only and works with
   any embedder whose cosine scale matches (the ONNX MiniLM's does).
3. **Logistic regression** over the standardised features → a probability that serving is right.
   The weights live in ``semantic_model.json``, written by ``benchmarks/semantic_fit.py`` from the
   shared QQP and STS-B *fit* splits only; the profile thresholds (``strict``, ``balanced``) were
   chosen on the *val* splits, and precision is reported on *test* splits no step saw
   (``benchmarks/semantic_accuracy.py``; numbers in docs/NOTES.md).
4. **Hard vetoes**: the few signals that, measured on the fit split among candidates, reject a wrong
   answer far more often than a right one (listed in the model file with their counts) reject
   whatever the probability.

A false rejection costs one LLM call; a false accept serves a wrong answer — hence a threshold
chosen for precision.  Retrieval verification (:mod:`ragline.cache.semantic_match`) still runs after
an accept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ragline.cache.guards import ALL_CHECKS, QueryFeatures, extract_features, guard_failures, guards_pass
from ragline.cache.guards_structure import structure

__all__ = ["SIGNALS", "Decision", "Model", "cached_features", "decide", "guards_accept", "load_model", "signals"]

STRUCTURE: Final = (
    "antonym_swap", "negation_moved", "modal_one_side_must", "modal_one_side_can", "modal_one_side_will", "deictic",
)  # fmt: skip
LEXICAL: Final = ("content_jaccard", "terms_jaccard", "content_diff", "length_ratio", "entity_diff", "number_diff")
SIGNALS: Final[tuple[str, ...]] = ("cos", *ALL_CHECKS, *STRUCTURE, *LEXICAL)
"""The named signals, in model order (each guard name is 1 when that guard alone would reject)."""
MODEL_FILE: Final = "semantic_model.json"


def _jaccard(a: frozenset[str] | set[str], b: frozenset[str] | set[str]) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 1.0


@lru_cache(maxsize=8192)
def cached_features(text: str) -> QueryFeatures:
    """:func:`~ragline.cache.guards.extract_features`, memoised (cached queries recur as candidates)."""
    return extract_features(text)


def signals(
    a_text: str, b_text: str, cos: float, fa: QueryFeatures | None = None, fb: QueryFeatures | None = None
) -> npt.NDArray[np.float64]:
    """The :data:`SIGNALS` of one pair, as floats."""
    fa = cached_features(a_text) if fa is None else fa
    fb = cached_features(b_text) if fb is None else fb
    out = [cos]
    out.extend(1.0 if failed else 0.0 for failed in guard_failures(fa, fb))
    st = structure(a_text, b_text)
    out.extend(1.0 if st[name] else 0.0 for name in STRUCTURE)
    ta, tb = set(fa.terms), set(fb.terms)
    la, lb = len(fa.terms), len(fb.terms)
    out.append(_jaccard(fa.content, fb.content))
    out.append(_jaccard(ta, tb))
    out.append(min(len(fa.content ^ fb.content), 6) / 6.0)
    out.append(min(la, lb) / max(la, lb) if max(la, lb) else 1.0)
    out.append(min(len(fa.entities ^ fb.entities), 4) / 4.0)
    out.append(min(len(fa.numbers ^ fb.numbers), 4) / 4.0)
    return np.asarray(out, dtype=np.float64)


@dataclass(frozen=True, slots=True)
class Linear:
    """Standardise, then logistic regression."""

    mean: npt.NDArray[np.float64]
    scale: npt.NDArray[np.float64]
    weights: npt.NDArray[np.float64]
    bias: float

    def prob(self, x: npt.NDArray[np.float64]) -> float:
        z = float(((x - self.mean) / self.scale) @ self.weights) + self.bias
        return 1.0 / (1.0 + float(np.exp(-z)))

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Linear:
        return cls(
            np.asarray(d["mean"], np.float64),
            np.asarray(d["scale"], np.float64),
            np.asarray(d["weights"], np.float64),
            float(d["bias"]),
        )


@dataclass(frozen=True, slots=True)
class Model:
    """The fitted decision: two linear models (with and without embedding features), profiles, vetoes."""

    full: Linear
    """Signals + ``u ⊙ v`` + ``|u − v|`` (vectors of dimension ``dim``)."""
    signals_only: Linear
    dim: int
    thresholds: dict[str, float]
    """Profile → probability threshold (``strict``, ``balanced``), and the same for signals_only."""
    thresholds_signals_only: dict[str, float]
    vetoes: tuple[str, ...]
    min_cosine: float
    meta: dict[str, Any]
    use_vectors: bool = False
    """Use ``full`` when the vectors fit (the fit script sets it when that model did better on val)."""

    def threshold(self, profile: str | float, with_vectors: bool) -> float:
        if isinstance(profile, float | int):
            return float(profile)
        table = self.thresholds if with_vectors else self.thresholds_signals_only
        return table[profile]


@lru_cache(maxsize=2)
def load_model(text: str | None = None) -> Model:
    """The committed model (``ragline/cache/semantic_model.json``), or one given as JSON text."""
    if text is None:
        text = resources.files("ragline.cache").joinpath(MODEL_FILE).read_text(encoding="utf-8")
    d = json.loads(text)
    if tuple(d["signals"]) != SIGNALS:
        raise ValueError(f"{MODEL_FILE} was fitted on other signals; re-run benchmarks/semantic_fit.py")
    return Model(
        Linear.from_json(d["full"]),
        Linear.from_json(d["signals_only"]),
        int(d["dim"]),
        {k: float(v) for k, v in d["thresholds"].items()},
        {k: float(v) for k, v in d["thresholds_signals_only"].items()},
        tuple(d["vetoes"]),
        float(d["min_cosine"]),
        dict(d.get("meta", {})),
        bool(d.get("use_vectors", False)),
    )


def pair_vector(sig: npt.NDArray[np.float64], u: npt.NDArray[Any], v: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """Signals followed by ``u ⊙ v`` and ``|u − v|``."""
    u64 = np.asarray(u, np.float64).reshape(-1)
    v64 = np.asarray(v, np.float64).reshape(-1)
    return np.concatenate([sig, u64 * v64, np.abs(u64 - v64)])


@dataclass(frozen=True, slots=True)
class Decision:
    accept: bool
    probability: float
    reason: str
    """Empty when accepted; the veto's name, or ``"probability below threshold"``."""


def decide(
    model: Model,
    profile: str | float,
    a_text: str,
    b_text: str,
    cos: float,
    u: npt.NDArray[Any] | None = None,
    v: npt.NDArray[Any] | None = None,
    fa: QueryFeatures | None = None,
) -> Decision:
    """Accept or reject serving ``b_text``'s answer for ``a_text`` (vectors ``u``, ``v``; cosine ``cos``)."""
    if cos < model.min_cosine:
        return Decision(False, 0.0, "cosine below semantic_min_cosine")
    sig = signals(a_text, b_text, cos, fa)
    for name in model.vetoes:
        if sig[SIGNALS.index(name)]:
            return Decision(False, 0.0, name)
    with_vectors = model.use_vectors and u is not None and v is not None and u.size == model.dim == v.size
    if with_vectors:
        assert u is not None and v is not None
        p = model.full.prob(pair_vector(sig, u, v))
    else:
        p = model.signals_only.prob(sig)
    ok = p >= model.threshold(profile, with_vectors)
    return Decision(ok, p, "" if ok else "probability below threshold")


GUARD_TAU: Final = {"balanced": 0.93, "strict": 0.95}
"""Cosine τ of each profile under ``semantic_decision: guards``."""
STRUCTURE_VETOES: Final = ("antonym_swap", "negation_moved", "modal_one_side_must", "deictic")
"""Structure checks that veto under ``semantic_decision: guards`` (the false accepts of issue 12)."""


def guards_accept(
    profile: str | float,
    a_text: str,
    b_text: str,
    cos: float,
    fa: QueryFeatures | None = None,
    checks: tuple[str, ...] = ALL_CHECKS,
) -> bool:
    """The guard rule: cosine ≥ the profile's τ (a float profile is τ itself), every feature guard of
    ``checks`` passes, and no structure veto (:data:`STRUCTURE_VETOES`) fires."""
    tau = float(profile) if isinstance(profile, float | int) else GUARD_TAU[profile]
    if cos < tau:
        return False
    fa = cached_features(a_text) if fa is None else fa
    if not guards_pass(fa, cached_features(b_text), checks)[0]:
        return False
    st = structure(a_text, b_text)
    return not any(st[name] for name in STRUCTURE_VETOES)
