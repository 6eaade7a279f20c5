"""The model-free conversation logic (ragline.condense): follow-up detection, standalone questions,
extractive summaries and the history token budget."""

from __future__ import annotations

from ragline import condense as cd
from ragline.types import Message


def words(text: str) -> int:
    return len(text.split())


def test_followups_and_standalone_questions() -> None:
    assert cd.is_followup("tell me more about that")
    assert cd.is_followup("Why?")
    assert cd.is_followup("How does it work?")
    assert cd.is_followup("and those?")
    assert not cd.is_followup("What is BM25 ranking?")
    assert not cd.is_followup("When did the Eiffel Tower open?")


def test_condense_rules_appends_the_previous_topic() -> None:
    prev = "What is the BM25 ranking function?"
    out = cd.condense_rules("tell me more about that", prev, 2000)
    assert out == "tell me more about that (BM25 ranking function)"
    assert cd.condense_rules("tell me more about that", prev, 2000) == out  # deterministic: one cache key
    # a question that stands alone is not rewritten (so it shares the answer of the same question anywhere)
    assert cd.condense_rules("When did the Eiffel Tower open?", prev, 2000) == "When did the Eiffel Tower open?"
    # the chain carries the topic: the follow-up of a follow-up still names it
    again = cd.condense_rules("why is it used?", out, 2000)
    assert "BM25" in again and again.startswith("why is it used?")
    # no earlier question, or no room under the limit: unchanged
    assert cd.condense_rules("tell me more", "", 2000) == "tell me more"
    assert cd.condense_rules("tell me more", prev, 20) == "tell me more"


def test_salient_terms_skip_stop_words_and_pronouns() -> None:
    assert cd.salient_terms("Can you tell me what the Eiffel Tower is made of?") == ["Eiffel", "Tower"]
    assert cd.salient_terms("what about it?") == []


def test_clean_standalone() -> None:
    assert cd.clean_standalone('Standalone question: "What is BM25?"\nextra', 100) == "What is BM25?"
    assert cd.clean_standalone("\n\n", 100) == ""
    assert cd.clean_standalone("x" * 200, 100) == ""


def test_clip_tokens() -> None:
    text = "one two three four five six"
    assert cd.clip_tokens(text, words, 10) == text
    clipped = cd.clip_tokens(text, words, 4)
    assert words(clipped) <= 4 and clipped.endswith("…") and clipped.startswith("one two three")


def turns(n: int, answer_words: int = 30) -> list[Message]:
    out: list[Message] = []
    for i in range(n):
        out.append({"role": "user", "content": f"question {i} about topic{i}?"})
        out.append({"role": "assistant", "content": f"Topic{i} is " + "word " * answer_words + "[1]. More text."})
    return out


def test_plan_fold_keeps_the_last_turn_and_meets_the_budget() -> None:
    msgs = turns(10)
    fold = cd.plan_fold(msgs, 0, words, 200)
    assert fold % 2 == 0 and 0 < fold < len(msgs)
    assert sum(cd.message_cost(m, words) for m in msgs[fold:]) <= 200
    assert cd.plan_fold(msgs[:2], 0, words, 10) == 0  # the last turn is never folded
    assert cd.plan_fold(turns(2), 0, words, 10_000) == 0


def test_summarize_rules_is_extractive_and_bounded() -> None:
    msgs = turns(6)
    s = cd.summarize_rules("", msgs[:4], ["What is topic0?", "What is topic1?"], words, 60)
    assert s.splitlines()[0].startswith("Asked: What is topic0?; answered: Topic0 is")
    assert "[1]" not in s and words(s) <= 60
    longer = cd.summarize_rules(s, msgs[4:8], ["q2", "q3"], words, 40)  # older lines go first
    assert words(longer) <= 40 and "q3" in longer


def test_fit_history_meets_the_budget() -> None:
    msgs = turns(3, answer_words=300)
    out = cd.fit_history("an earlier summary", msgs, words, 150)
    assert out[0]["content"].startswith(cd.SUMMARY_PREFIX)
    assert sum(cd.message_cost(m, words) for m in out) <= 150
    assert [m["role"] for m in out[1:]] == [m["role"] for m in msgs]


def test_prompts() -> None:
    hist: list[Message] = [{"role": "user", "content": "What is BM25?"}, {"role": "assistant", "content": "A ranking."}]
    m = cd.condense_messages(hist, "tell me more")
    assert m[0]["role"] == "system" and "User: What is BM25?" in m[1]["content"]
    assert m[1]["content"].endswith("Follow-up question: tell me more")
    s = cd.summary_messages("old", hist, 50)
    assert "50 words" in s[0]["content"] and s[1]["content"].startswith(cd.SUMMARY_PREFIX + "old")
