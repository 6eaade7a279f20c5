"""Structure checks of the semantic cache: where a pair's words *sit*, not only which words it has.

The feature guards (:mod:`ragline.cache.guards`) compare bags of features; these checks catch the
false accepts that survive a bag comparison because both queries hold the same words:

============== ==================================================================================
antonym_swap   two antonyms trade places: "why do men earn more than women" / "... women ... men",
               "buy high, sell low" / "buy low, sell high" (stop-word antonyms count: more/less,
               before/after, he/she, up/down)
negation_moved both queries negate, but not the same thing: "people who don't smoke get cancer" /
               "people who smoke don't get cancer"
modal_one_side a modal verb on one side only, by class: "what does a nurse know" / "what should a
               nurse know" (``must``), "will" / none, "can" / none (a feature, rarely a veto:
               "how can I" and "how do I" usually ask the same)
deictic        a pronoun pointing outside the text: "is this true", "what does that mean",
               "are these safe" — its answer depends on something the cache never saw
============== ==================================================================================

Each returns a bool; :func:`structure` computes them all from the two texts (cached per text).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

from ragline.cache.guards import ANTONYMS, STOP_STEMS, stem
from ragline.cache.guards_words import MODALS, NEGATION_WORDS

__all__ = ["StructureFeatures", "structure", "structure_features"]

_WORD_RE: Final = re.compile(r"[a-z0-9]+(?:['’][a-z]+)?")
_DEICTIC_RE: Final = re.compile(
    r"\b(?:(?:is|are|was|were|does|do|did|can|will|would|should|could|has|have|about|of|in|on|with)\s+"
    r"(?:this|that|these|those)\b(?!\s+(?:is|are|was|were)\b)|"
    r"\b(?:this|that|these|those)\s+(?:is|are|was|were|mean|means|meant|say|says|said)\b|"
    r"\b(?:this|these|those)\s*$|"
    r"^\s*(?:this|that|these|those)\b)",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class StructureFeatures:
    """Positions and scopes of one query (lower-case stems)."""

    stems: tuple[str, ...]
    negation_scope: frozenset[str]
    """The content stem each negation cue follows ("people who don't smoke" → people, "people who
    smoke don't" → smoke)."""
    modal_classes: frozenset[str]
    deictic: bool


@lru_cache(maxsize=8192)
def structure_features(text: str) -> StructureFeatures:
    """The structure features of one query (pure; memoised: the cached side recurs)."""
    words = _WORD_RE.findall(text.lower().replace("’", "'"))
    stems: list[str] = []
    neg_at: list[int] = []
    for w in words:
        if w.endswith("n't"):
            neg_at.append(len(stems))
            base = {"can't": "can", "won't": "will", "shan't": "shall"}.get(w, w[:-3])
            stems.append(stem(base))
            continue
        if w in NEGATION_WORDS:
            neg_at.append(len(stems))
        stems.append(stem(w))
    scope: set[str] = set()
    content = [(i, s) for i, s in enumerate(stems) if s not in STOP_STEMS and s not in NEGATION_WORDS]
    for i in neg_at:
        before = [s for j, s in content if j < i]
        after = [s for j, s in content if j > i]
        # the content word the negation follows; a clause-initial cue ("why don't cats ...", "can't I
        # sleep") is an inverted auxiliary, so it counts as following the first content word after it
        scope.add(before[-1] if before else after[0] if after else "<none>")
    modals = frozenset(MODALS[w] for w in words if w in MODALS) | frozenset(
        MODALS.get(stem(w[:-3]) if w.endswith("n't") else "", "") for w in words if w.endswith("n't")
    ) - {""}
    return StructureFeatures(tuple(stems), frozenset(scope), modals, _DEICTIC_RE.search(text) is not None)


def antonym_swap(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Two antonyms present in both queries, in the opposite order."""
    first_a = {s: i for i, s in reversed(list(enumerate(a)))}
    first_b = {s: i for i, s in reversed(list(enumerate(b)))}
    shared = [s for s in first_a if s in first_b and s in ANTONYMS]
    for i, x in enumerate(shared):
        for y in shared[i + 1 :]:
            if y in ANTONYMS[x] and (first_a[x] < first_a[y]) != (first_b[x] < first_b[y]):
                return True
    return False


def structure(a_text: str, b_text: str) -> dict[str, bool]:
    """Every structure check of a pair: True means the check found a difference."""
    a, b = structure_features(a_text), structure_features(b_text)
    one_side = a.modal_classes ^ b.modal_classes
    return {
        "antonym_swap": antonym_swap(a.stems, b.stems),
        "negation_moved": bool(a.negation_scope and b.negation_scope and a.negation_scope != b.negation_scope),
        "modal_one_side_must": "must" in one_side,
        "modal_one_side_can": "can" in one_side,
        "modal_one_side_will": "will" in one_side,
        "deictic": a.deictic or b.deictic,
    }
