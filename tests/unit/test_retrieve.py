"""RRF, MMR and doc-level grouping against hand-checked examples."""

import numpy as np
import pytest

from ragline.retrieve import best_per_document, mmr, rrf
from ragline.types import Hit, Scored


def test_rrf_hand_checked_example() -> None:
    dense = [Scored("a", 0.9), Scored("b", 0.8), Scored("c", 0.7)]
    keyword = [Scored("c", 12.0), Scored("a", 9.0), Scored("d", 3.0)]
    fused = rrf([dense, keyword], k=60)
    # a: 1/61 + 1/62, c: 1/63 + 1/61, b: 1/62, d: 1/63 (computed by hand)
    assert [cid for cid, _ in fused] == ["a", "c", "b", "d"]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)
    assert fused[1][1] == pytest.approx(1 / 63 + 1 / 61)
    assert fused[2][1] == pytest.approx(1 / 62)
    assert fused[3][1] == pytest.approx(1 / 63)


def test_rrf_ignores_raw_scores_and_breaks_ties_deterministically() -> None:
    fused = rrf([[Scored("x", 1e9)], [Scored("y", -5.0)]], k=60)
    assert [cid for cid, _ in fused] == ["x", "y"]  # equal RRF: first seen (dense) first
    assert fused[0][1] == fused[1][1]


def test_rrf_empty_and_single() -> None:
    assert rrf([[], []]) == []
    assert [c for c, _ in rrf([[Scored("a", 1), Scored("b", 0)], []])] == ["a", "b"]


def test_mmr_prefers_diverse_candidate() -> None:
    q = np.array([1.0, 0.0, 0.0], dtype=np.float32)
    cands = np.array([[1, 0, 0], [1, 0, 0], [0.6, 0.8, 0]], dtype=np.float32)
    # the duplicate (index 1) has higher relevance than index 2, but MMR picks 2 second
    order = mmr(q, cands, [1.0, 0.95, 0.8], 3, lambda_=0.5)
    assert order[:2] == [0, 2]
    assert sorted(order) == [0, 1, 2]


def test_mmr_lambda_one_is_relevance_order() -> None:
    q = np.array([1.0, 0.0], dtype=np.float32)
    cands = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32)
    assert mmr(q, cands, [0.5, 1.0, 0.7], 3, lambda_=1.0) == [1, 2, 0]
    assert mmr(q, cands, [], 3, 0.5) == []


def test_best_per_document_keeps_first_chunk_of_each_doc() -> None:
    hits = [Hit("d1#2", "d1", "x", 0.9), Hit("d2#0", "d2", "y", 0.8), Hit("d1#0", "d1", "z", 0.7)]
    assert [h.chunk_id for h in best_per_document(hits)] == ["d1#2", "d2#0"]
