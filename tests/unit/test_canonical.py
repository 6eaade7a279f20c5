"""The canonical form of a query: trivial variants share one exact key, answer-changing edits never do."""

from __future__ import annotations

import pytest

from ragline.cache.keys import canonical_query
from ragline.canonical import canonical, query_form
from ragline.config import Settings
from ragline.validate import build_query

BASE = "What is the role of IL-6 in sepsis"


@pytest.mark.parametrize(
    "variant",
    [
        "What is the role of IL-6 in sepsis?",
        "What is the role of IL-6 in sepsis.",
        "What is the role of IL-6 in sepsis?!",
        "what is the role of il-6 in sepsis",
        "WHAT IS THE ROLE OF IL-6 IN SEPSIS?",
        "  What is the role   of IL-6\tin sepsis ?  ",
        "Please tell me about what is the role of IL-6 in sepsis?",
        "please, what is the role of IL-6 in sepsis",
        "Can you tell me what is the role of IL-6 in sepsis?",
        "Could you please tell me: what is the role of IL-6 in sepsis?",
        "I'd like to know what is the role of IL-6 in sepsis.",
        "I would like to know what is the role of IL-6 in sepsis",
        "Hi, what is the role of IL-6 in sepsis?",
        "What is the role of IL-6 in sepsis, please?",
        "What is the role of IL-6 in sepsis? Thanks!",
        "what is the role of IL-6 in sepsis… thank you",
    ],
)
def test_trivial_variants_share_the_canonical_form(variant: str) -> None:
    assert canonical(variant) == canonical(BASE)
    assert canonical_query(variant) == canonical(BASE)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Is aspirin safe?", "Is aspirin not safe?"),
        ("Is aspirin safe?", "Isn't aspirin safe?"),
        ("Does X cause cancer?", "Does X never cause cancer?"),
        ("What happened in 2016?", "What happened in 2017?"),
        ("Dose of 5 mg?", "Dose of 50 mg?"),
        ('What does "hello." mean?', 'What does "hello" mean?'),
        ("What is C++?", "What is C?"),
        ("What is x²?", "What is x2?"),
        ("Why is the sky blue?", "How is the sky blue?"),
        ("What is X? How is it treated?", "What is X? How is it treated? Why?"),
        ("please don't tell me about X", "X"),
        ("Can't you tell me about X?", "X"),
        ("What is 3.14?", "What is 314?"),
    ],
)
def test_answer_changing_edits_keep_distinct_forms(a: str, b: str) -> None:
    assert canonical(a) != canonical(b)


def test_form_keeps_case_and_inner_punctuation_and_is_idempotent() -> None:
    assert query_form("Please tell me about COVID-19 in the U.S.?") == "COVID-19 in the U.S"
    assert query_form("What is X? How is it treated?") == "What is X? How is it treated"
    for t in ("Hi, could you please tell me about aspirin, thanks!", "What is RAG?", "  a  b  "):
        assert query_form(query_form(t)) == query_form(t)


def test_filler_or_punctuation_only_queries_are_kept() -> None:
    assert query_form("?") == "?"
    assert query_form("  please  ") == "please"
    assert query_form("tell me about it") == "it"  # something follows the filler: it goes
    assert query_form("Tell me about") == "Tell me about"


def test_validation_computes_the_form_once_and_keeps_the_raw_text() -> None:
    q = build_query(Settings(), "Please tell me about RAG?", None, "default", (), "default")
    assert (q.text, q.canonical, q.raw) == ("RAG", "rag", "Please tell me about RAG?")
    again = build_query(Settings(), q, None, "default", (), "default")  # a Query passed back in
    assert (again.text, again.canonical, again.raw) == (q.text, q.canonical, q.raw)
