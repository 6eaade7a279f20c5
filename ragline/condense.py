"""Conversation logic without a model: standalone questions, history compression, prompts.

A follow-up such as "tell me more about that" retrieves nothing useful on its own, and a conversation's
history grows without bound.  Each turn therefore (1) folds the oldest turns into a summary while the
history is over its token budget (:func:`plan_fold`, :func:`summarize_rules` or the LLM prompt of
:func:`summary_messages`) and (2) condenses the follow-up into a standalone question (the LLM prompt of
:func:`condense_messages`, or :func:`condense_rules`: an anaphoric or content-free follow-up gets the
salient terms of the previous standalone question appended).  The standalone question is what is
retrieved, answered and cached, so two conversations asking the same follow-up about different topics
never share an answer, while the same standalone question does.

Pure functions over messages and a token counter (:mod:`ragline.conversation` runs them per turn).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from ragline.types import Message

__all__ = [
    "clean_standalone",
    "clip_tokens",
    "condense_messages",
    "condense_rules",
    "fit_history",
    "is_followup",
    "plan_fold",
    "salient_terms",
    "summarize_rules",
    "summary_messages",
]

TokenCounter = Callable[[str], int]
MESSAGE_OVERHEAD = 4
"""Tokens a chat message costs beyond its content (role and separators), as ``context.trim_history`` counts."""

_WORD = re.compile(r"[^\W_][\w'.\-]*[^\W_]|[^\W_]", re.UNICODE)
_CITATION = re.compile(r"\s*\[\d+\](?:\[\d+\])*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")
_ANAPHORA = frozenset(
    """it its it's itself that this these those they them their theirs he him his she her hers there such
    same former latter above aforementioned one ones""".split()
)
_STOP = (
    frozenset(
        """a an and are as at be been being but by can could did do does doing for from had has have having how i
    if in into is was were will would shall should may might must of on or so than then the to too very what
    when where which who whom whose why with me my mine we us our you your yours not no yes please also else
    more most less much many some any all other another again still just only even ever about over under
    tell explain describe elaborate say give show go continue further details detail info information know
    example examples more thing things something anything stuff ok okay thanks thank and, etc really mean
    between compare compared versus vs make made get got like""".split()
    )
    | _ANAPHORA
)
_MAX_TERMS = 8

CONDENSE_SYSTEM = (
    "Rewrite the user's follow-up question as one standalone question that can be understood without the "
    "conversation: replace pronouns and references (it, that, they, the second one) with what they refer to. "
    "If the question is already standalone, return it unchanged. Reply with the question only."
)
SUMMARY_SYSTEM = (
    "Summarise the conversation below in at most {words} words for someone who will answer its next "
    "question. Keep the topics, names, numbers and facts a follow-up may refer to. Reply with the summary only."
)
SUMMARY_PREFIX = "Summary of the earlier conversation: "


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def salient_terms(text: str, limit: int = _MAX_TERMS) -> list[str]:
    """The content words of ``text`` in order (case kept, duplicates dropped): no stop words, no
    pronouns, no conversational verbs ("tell", "explain"), so what is left names the topic."""
    out: list[str] = []
    seen: set[str] = set()
    for w in _words(text):
        low = w.casefold()
        if low in _STOP or low in seen or (len(w) < 2 and not w.isdigit()):
            continue
        seen.add(low)
        out.append(w)
        if len(out) >= limit:
            break
    return out


def is_followup(question: str) -> bool:
    """Does ``question`` lean on the conversation: a pronoun or reference ("it", "that", "those"), or no
    content words at all ("tell me more", "why?")?  A heuristic for the model-free fallback."""
    words = [w.casefold() for w in _words(question)]
    return any(w in _ANAPHORA for w in words) or not salient_terms(question, 1)


def condense_rules(question: str, previous: str, max_chars: int) -> str:
    """The standalone question without a model: a follow-up gets the previous standalone question's
    salient terms appended ("tell me more about that (BM25 ranking)"); any other question stands alone.
    Deterministic, so the same follow-up after the same question always makes the same cache key."""
    question = " ".join(question.split())
    if not previous or not is_followup(question):
        return question
    own = {w.casefold() for w in _words(question)}
    terms = [t for t in salient_terms(previous) if t.casefold() not in own]
    if not terms:
        return question
    out = f"{question} ({' '.join(terms)})"
    return out if len(out) <= max_chars else question


def _transcript(summary: str, messages: Sequence[Message]) -> str:
    lines = [f"{SUMMARY_PREFIX}{summary}"] if summary else []
    for m in messages:
        who = "User" if m["role"] == "user" else "Assistant"
        lines.append(f"{who}: {m['content']}")
    return "\n".join(lines)


def condense_messages(history: Sequence[Message], question: str) -> list[Message]:
    """The LLM prompt that condenses ``question`` given the (compressed) history."""
    transcript = "\n".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in history)
    return [
        {"role": "system", "content": CONDENSE_SYSTEM},
        {"role": "user", "content": f"Conversation:\n{transcript}\n\nFollow-up question: {question}"},
    ]


def clean_standalone(reply: str, max_chars: int) -> str:
    """The question in an LLM's condensation reply ("" if there is none usable): its first line, without
    a "Standalone question:" label or quotes."""
    for line in reply.splitlines():
        line = line.strip()
        if not line:
            continue
        line = re.sub(r"^(standalone question|question|rewritten question)\s*:\s*", "", line, flags=re.I)
        line = line.strip().strip("\"'`").strip()
        return line if 0 < len(line) <= max_chars else ""
    return ""


def summary_messages(summary: str, folded: Sequence[Message], words: int) -> list[Message]:
    """The LLM prompt that folds ``folded`` (the oldest turns) into the running ``summary``."""
    return [
        {"role": "system", "content": SUMMARY_SYSTEM.format(words=words)},
        {"role": "user", "content": _transcript(summary, folded)},
    ]


def clip_tokens(text: str, count: TokenCounter, limit: int) -> str:
    """``text`` cut at a word boundary to at most ``limit`` tokens (an ellipsis marks a cut)."""
    if count(text) <= limit:
        return text
    words = text.split()
    lo, hi = 0, len(words)
    while lo < hi:  # the longest prefix that fits, with the ellipsis
        mid = (lo + hi + 1) // 2
        if count(" ".join(words[:mid]) + " …") <= limit:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo]) + " …" if lo else ""


def _first_sentence(text: str) -> str:
    text = _CITATION.sub("", " ".join(text.split()))
    return _SENTENCE_END.split(text, maxsplit=1)[0] if text else ""


def summarize_rules(
    summary: str, folded: Sequence[Message], standalones: Sequence[str], count: TokenCounter, budget: int
) -> str:
    """The running summary without a model: one line per folded turn ("Asked: <standalone question>;
    answered: <first sentence>"), oldest lines dropped past ``budget`` tokens."""
    lines = [ln for ln in summary.split("\n") if ln] if summary else []
    asked = iter(standalones)
    pending = ""
    for m in folded:
        if m["role"] == "user":
            if pending:
                lines.append(pending)
            q = next(asked, "") or m["content"]
            pending = f"Asked: {clip_tokens(' '.join(q.split()), count, max(8, budget // 4))}"
        else:
            answer = clip_tokens(_first_sentence(m["content"]), count, max(8, budget // 3))
            lines.append(f"{pending}; answered: {answer}" if pending else f"Answered: {answer}")
            pending = ""
    if pending:
        lines.append(pending)
    while lines and count("\n".join(lines)) > budget:
        if len(lines) == 1:
            return clip_tokens(lines[0], count, budget)
        lines.pop(0)
    return "\n".join(lines)


def message_cost(m: Message, count: TokenCounter) -> int:
    return count(m["content"]) + MESSAGE_OVERHEAD


def plan_fold(messages: Sequence[Message], summary_cost: int, count: TokenCounter, budget: int) -> int:
    """How many of the oldest ``messages`` to fold into the summary (a multiple of 2, a user turn with
    its answer) so that the summary and the rest fit ``budget``; the last turn is never folded."""
    costs = [message_cost(m, count) for m in messages]
    total = summary_cost + sum(costs)
    fold = 0
    while total > budget and len(messages) - fold > 2:
        total -= sum(costs[fold : fold + 2])
        fold += 2
    return fold


def fit_history(summary: str, recent: Sequence[Message], count: TokenCounter, budget: int) -> list[Message]:
    """The history as prompt messages within ``budget`` tokens: the summary (as an assistant note) then the
    recent turns, each clipped to an equal share when together they are still over budget."""
    out: list[Message] = []
    used = 0
    if summary:
        note = {"role": "assistant", "content": SUMMARY_PREFIX + summary}
        used = message_cost(note, count)
        out.append(note)
    msgs = [{"role": m["role"], "content": m["content"]} for m in recent]
    if used + sum(message_cost(m, count) for m in msgs) > budget and msgs:
        share = max(0, (budget - used) // len(msgs) - MESSAGE_OVERHEAD)
        msgs = [{"role": m["role"], "content": clip_tokens(m["content"], count, share)} for m in msgs]
        msgs = [m for m in msgs if m["content"]]
    return out + msgs
