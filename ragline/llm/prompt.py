"""The prompt template: numbered sources, history, question.

``PROMPT_VERSION`` is part of every answer cache key; bump it whenever the
template text changes so no answer built from an old template is served.
The extractive answerer reads the same structure back with ``parse_prompt``,
so the format lives in exactly one module.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ragline.types import Hit, Message

PROMPT_VERSION = "v1"

SYSTEM = (
    "You answer questions using only the numbered sources below. Cite every claim with the "
    "number of its source in square brackets, like [1] or [2][3]. If the sources do not contain "
    "the answer, say that you do not know. Be concise."
)

_SOURCE_HEADER = re.compile(r"^\[(\d+)\](?: (.*))?$")
_QUESTION = "Question: "


def build_messages(question: str, sources: Sequence[Hit], history: Sequence[Message] = ()) -> list[Message]:
    """System instructions, prior turns, then one user message with sources and question."""
    blocks = []
    for n, h in enumerate(sources, start=1):
        header = f"[{n}] {h.title}" if h.title else f"[{n}]"
        blocks.append(f"{header}\n{h.text}")
    context = "\n\n".join(blocks) if blocks else "(no sources found)"
    user = f"Sources:\n\n{context}\n\n{_QUESTION}{question}"
    return [{"role": "system", "content": SYSTEM}, *history, {"role": "user", "content": user}]


def parse_prompt(messages: Sequence[Message]) -> tuple[str, list[str]]:
    """Inverse of ``build_messages`` for the last user message: (question, source texts)."""
    content = messages[-1]["content"] if messages else ""
    body, _, question = content.rpartition(f"\n\n{_QUESTION}")
    if not _:
        return content.strip(), []
    body = body.removeprefix("Sources:\n\n")
    sources: list[str] = []
    for block in body.split("\n\n[") if body != "(no sources found)" else []:
        block = block if block.startswith("[") else "[" + block
        head, _, text = block.partition("\n")
        if _SOURCE_HEADER.match(head):
            sources.append(text)
        elif sources:
            sources[-1] += "\n\n" + block
    return question.strip(), sources
