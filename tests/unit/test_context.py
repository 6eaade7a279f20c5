"""Token packing, near-duplicate removal and history trimming."""

import numpy as np

from ragline.context import drop_near_duplicates, pack, same_evidence, trim_history
from ragline.types import Hit


def words(text: str) -> int:
    return len(text.split())


def hit(cid: str, text: str, title: str = "") -> Hit:
    return Hit(cid, cid.split("#")[0], text, 1.0, title)


def test_pack_best_first_within_budget_skips_too_long() -> None:
    hits = [hit("a#0", "one two three"), hit("b#0", "w " * 50), hit("c#0", "four five")]
    out = pack(hits, words, budget=20, max_sources=10, per_source_overhead=2)
    # a costs 5, b costs 52 (skipped), c costs 4
    assert [h.chunk_id for h in out] == ["a#0", "c#0"]


def test_pack_counts_title_and_respects_max_sources() -> None:
    hits = [hit(f"d{i}#0", f"x{i} y", title="t t t") for i in range(5)]
    out = pack(hits, words, budget=100, max_sources=3, per_source_overhead=0)
    assert len(out) == 3
    assert pack(hits, words, budget=9, max_sources=10, per_source_overhead=0) == hits[:1]


def test_exact_and_near_duplicates_dropped() -> None:
    hits = [hit("a#0", "Same  text"), hit("b#0", "same text"), hit("c#0", "other"), hit("d#0", "near")]
    vecs = np.array([[1, 0], [1, 0], [0, 1], [0.999, 0.04]], dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    assert drop_near_duplicates(hits, vecs, 0.95) == [0, 2]
    assert drop_near_duplicates(hits, None, 0.95) == [0, 2, 3]


def test_trim_history_keeps_latest_within_budget() -> None:
    hist = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i} " * 3} for i in range(10)]
    out = trim_history(hist, words, budget=15, max_turns=3)
    assert [m["content"] for m in out] == [hist[-2]["content"], hist[-1]["content"]]
    assert trim_history(hist, words, budget=1000, max_turns=2) == hist[-4:]
    assert trim_history(hist, words, budget=1000, max_turns=0) == []


def test_same_evidence_ignores_order_not_membership() -> None:
    assert same_evidence(["a#0", "b#1"], ("b#1", "a#0"))
    assert not same_evidence(["a#0", "b#1"], ["a#0"])
    assert not same_evidence(["a#0", "b#1"], ["a#0", "c#0"])
    assert same_evidence([], [])
