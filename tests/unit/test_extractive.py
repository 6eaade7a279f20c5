"""The extractive answerer's sentence splitting and selection (no model)."""

from __future__ import annotations

from ragline.llm.extractive import NO_ANSWER, extract, split_sentences


def test_headings_are_not_sentences_and_wrapped_lines_join() -> None:
    text = "# BM25 ranking\nBM25 is a ranking function. It was developed\nby Robertson.\n\n## How\nScores add up."
    assert split_sentences(text) == ["BM25 is a ranking function.", "It was developed by Robertson.", "Scores add up."]


def test_extract_cites_the_best_sentences_in_source_order() -> None:
    sources = ["# Cats\nCats sleep sixteen hours a day. They purr.", "Dogs bark at strangers."]
    answer = extract("How long do cats sleep?", sources, 2)
    assert answer.startswith("Cats sleep sixteen hours a day. [1]") and "#" not in answer
    assert extract("zebra?", sources, 2) == NO_ANSWER
