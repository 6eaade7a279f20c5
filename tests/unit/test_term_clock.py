"""The term clock: a change advances it in O(terms); a read checks its entry's terms (DESIGN.md §3.1).

Fast: AsyncRAG with HashEmbedder + ScriptedLLM, L1 + L3, no services.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ragline.cache.clock import GONE, MAX_VECTORS, MOVED, UNAFFECTED, TermClock
from ragline.cache.marks import is_marked, mark, new_token, payload, stamp_of, stamped, unmarked
from ragline.config import Settings
from ragline.pipeline import AsyncRAG
from ragline.testing import HashEmbedder, ScriptedLLM
from ragline.types import Change, Document

DOCS = [
    Document("paris", "Paris is the capital of France. The Eiffel Tower opened in 1889.", "Paris"),
    Document("cats", "Domestic cats sleep for sixteen hours a day and purr when content.", "Cats"),
    Document("tea", "Green tea contains caffeine and antioxidants called catechins.", "Tea"),
    Document("rome", "Rome was founded on seven hills beside the river Tiber.", "Rome"),
    Document("owls", "Owls hunt at night and swallow their prey whole.", "Owls"),
    Document("bees", "Honey bees dance to tell the hive where flowers bloom.", "Bees"),
]
Q = "When did the Eiffel Tower open?"
UNRELATED = Document("zinc", "Zinc galvanises steel against rust.", "Zinc")  # no term of Q
RELATED = Document("tower", "Tower cranes lift steel beams on building sites.", "Cranes")  # shares "tower"


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def make(**cache: Any) -> Settings:
        return Settings(
            data_dir=tmp_path / "data",
            cache={"enabled": True, "redis_url": None, "semantic": False, **cache},
            retrieval={"k": 1, "candidates": 3},
            context={"max_sources": 1},
        )

    return make


def test_clock_answers_per_term_candidate_context_and_vector() -> None:
    e = np.eye(4, dtype=np.float32)
    c = TermClock([("t", "", 4), ("t", "tower", 3), ("t", "cat", 4)], floor=4)

    def verdict(stamp: int, terms: tuple[str, ...] = (), cands: tuple[str, ...] = (), ctx: tuple[str, ...] = (),
                v: np.ndarray = e[0], cutoff: float | None = 0.9) -> int:  # fmt: skip
        return c.affected("t", stamp, terms, cands, ctx, v, cutoff)

    assert c.now["t"] == 4 and c.terms("t") == 2
    assert verdict(4, ("tower",)) == UNAFFECTED and verdict(3) == GONE  # before the floor: unknown
    c.record(Change(5, "t", ("old#0",), ("new#0",), ("paris",)), e[1][None, :])
    assert c.now["t"] == 5
    assert verdict(4) == UNAFFECTED  # nothing of it reaches this entry
    assert verdict(4, ("paris", "x")) == MOVED  # a shared term: its BM25 statistics moved
    assert verdict(4, cands=("old#0",)) == MOVED and verdict(4, cands=("old#0",), ctx=("old#0",)) == GONE
    assert verdict(4, v=e[1]) == MOVED and verdict(4, v=e[2]) == UNAFFECTED  # the new vector enters or not
    assert verdict(4, v=e[2], cutoff=None) == MOVED  # a dense list that was not full takes anything
    assert verdict(5, ("paris",), ("old#0",), ("old#0",), e[1]) == UNAFFECTED  # stamped after the change
    c.record(Change(6, "t", ("*",), ("*",), ("*",)), None)  # the store reloaded: everything is unknown
    assert verdict(5) == GONE and verdict(6) == UNAFFECTED


def test_the_clock_forgets_old_vectors_and_then_knows_it() -> None:
    c = TermClock()
    v = np.eye(4, dtype=np.float32)[0][None, :]
    for seq in range(1, MAX_VECTORS + 2):
        c.record(Change(seq, "t", (), (f"c{seq}",), ()), v)
    assert c.affected("t", 1, (), (), (), v[0], 0.5) == GONE  # its window no longer reaches back there
    assert c.affected("t", MAX_VECTORS, (), (), (), -v[0], 0.5) == UNAFFECTED


def test_stamps_sit_under_marks_and_never_reach_a_client() -> None:
    v = b'{"answer": "x"}'
    s = stamped(v, 7)
    assert s[0] == 0 and stamp_of(s) == 7 and payload(s) == v and stamp_of(v) is None
    m = mark(s, new_token())
    assert is_marked(m) and stamp_of(m) == 7 and payload(m) == v and unmarked(m) == s
    assert stamp_of(stamped(m, 9)) == 9 and not is_marked(stamped(m, 9))  # restamping clears the mark


async def test_a_keyword_change_costs_no_marks_and_an_untouched_entry_needs_no_retrieval(
    make_settings: Callable[..., Settings],
) -> None:
    llm = ScriptedLLM()
    async with AsyncRAG(make_settings(), embedder=HashEmbedder(), llm=llm) as rag:
        await rag.ingest(DOCS)
        first = await rag.ask(Q)
        cache = rag.cache
        assert cache is not None and cache.clock is not None
        key = cache.answer_key("default", Q, 1, ())
        assert cache.get_l1(key, "default") is not None
        before = cache.clock.now["default"]
        await rag.ingest([UNRELATED])
        assert cache.clock.now["default"] == before + 1
        assert cache.counter("invalidation_marked") == 0  # nothing entered the dense lists, no term marks
        assert cache.get_l1(key, "default") is None  # stamped before the change: checked first
        body, info = await rag.ask_body(Q)
        assert info.kind == "exact" and body[0] == ord("{")
        assert cache.counter("clock_checked") == 1 and cache.counter("clock_unaffected") == 1
        assert cache.counter("reverify_on_read") == 0 and llm.calls == 1
        assert cache.get_l1(key, "default") == body  # restamped: the hot path serves it again
        assert (await rag.ask(Q)).text == first.text and cache.counter("clock_checked") == 1


async def test_an_entry_whose_terms_changed_is_reverified_by_retrieval(
    make_settings: Callable[..., Settings],
) -> None:
    llm = ScriptedLLM()
    async with AsyncRAG(make_settings(), embedder=HashEmbedder(), llm=llm) as rag:
        await rag.ingest(DOCS)
        first = await rag.ask(Q)
        cache = rag.cache
        assert cache is not None
        await rag.ingest([RELATED])
        again = await rag.ask(Q)
        assert cache.counter("reverify_on_read") >= 1 and cache.counter("clock_unaffected") == 0
        assert again.cache.kind == "exact" and again.sources == first.sources and llm.calls == 1
        # the new document takes the only source: the entry is dropped and recomputed
        await rag.ingest([Document("paris", "The Eiffel Tower did open in 1889; when did the tower open? 1889.")])
        changed = await rag.ask(Q)
        assert changed.cache.kind == "miss" and llm.calls == 2


async def test_the_clock_survives_a_restart_with_the_l3_stamps(make_settings: Callable[..., Settings]) -> None:
    async with AsyncRAG(make_settings(), embedder=HashEmbedder(), llm=ScriptedLLM()) as rag:
        await rag.ingest(DOCS)
        await rag.ask(Q)
        await rag.ingest([RELATED])  # the entry's stamp is now older than the clock
        assert rag.cache is not None and rag.cache.clock is not None
        now = rag.cache.clock.now["default"]
    llm = ScriptedLLM()
    async with AsyncRAG(make_settings(), embedder=HashEmbedder(), llm=llm) as rag:
        assert rag.cache is not None and rag.cache.clock is not None
        assert rag.cache.clock.now["default"] == now and rag.cache.clock.terms("default") > 0
        hit = await rag.ask(Q)
        assert hit.cache.kind == "exact" and llm.calls == 0 and rag.cache.counter("reverify_on_read") >= 1


@pytest.mark.parametrize("mode", ["eager", "flush"])
async def test_only_lazy_mode_stamps(make_settings: Callable[..., Settings], mode: str) -> None:
    async with AsyncRAG(make_settings(invalidation=mode), embedder=HashEmbedder(), llm=ScriptedLLM()) as rag:
        await rag.ingest(DOCS)
        await rag.ask(Q)
        assert rag.cache is not None and rag.cache.clock is None
        key = rag.cache.answer_key("default", Q, 1, ())
        body = rag.cache.get_l1(key, "default")
        assert body is not None and body[0] == ord("{")
