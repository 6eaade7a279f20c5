"""Conversations over the pipeline: ``conversation_id`` turns and stateless chat histories.

A turn (:meth:`Conversations.prepare`) loads the history (the store's, or the messages a chat request
sent), folds its oldest turns into a summary while it is over ``conversation.history_token_budget``
tokens, and condenses the question into a standalone one (:mod:`ragline.condense`; by the LLM when
one is configured, by rules for the extractive answerer).  The pipeline then answers the standalone
question as it answers any query, through every cache: the answer key is the standalone question
(plus the compressed history when ``conversation.history_in_prompt``), so a follow-up is never served
another conversation's answer, while the same standalone question is one cache entry for everyone.
:meth:`Conversations.record` stores the turn in the store (``ConversationStore``: SQLite for the
embedded store, PostgreSQL tables for the shared one), so any instance can serve the next turn.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from ragline import condense as cd
from ragline.config import ConversationSettings
from ragline.errors import InvalidInput, NotFound, PayloadTooLarge, RaglineError
from ragline.llm.base import FALLBACK_FINISH
from ragline.llm.cached import CachedLLM
from ragline.pipeline import AsyncRAG
from ragline.store.base import Conversation, ConversationStore, Turn
from ragline.store.conversations import MemoryConversations
from ragline.types import DEFAULT_TENANT, CacheInfo, CacheMode, Message
from ragline.validate import build_query, check_history, check_unicode

__all__ = ["Conversations", "Prepared"]

log = logging.getLogger("ragline.conversation")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]*")
Event = tuple[str, dict[str, Any]]


@dataclass(slots=True)
class Prepared:
    """One turn, ready to answer: the standalone question and the history that goes into the prompt."""

    tenant: str
    question: str
    standalone: str
    history: tuple[Message, ...]
    """What the answer prompt gets (empty unless ``conversation.history_in_prompt``)."""
    conversation_id: str | None
    turn: int
    """1-based number of this user turn in its conversation (or in the request's messages)."""

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"turn": self.turn, "standalone_question": self.standalone}
        if self.conversation_id is not None:
            out = {"id": self.conversation_id, **out}
        return out


class Conversations:
    """Stored conversations of every tenant, and the per-turn work (condense, compress, record)."""

    def __init__(self, rag: AsyncRAG) -> None:
        self.rag = rag
        self.settings: ConversationSettings = rag.settings.conversation
        self._store: ConversationStore | None = None
        self._llm: CachedLLM | None = None
        self._appends = 0
        s = rag.settings
        mode = self.settings.condense
        self.use_llm = mode == "llm" or (mode == "auto" and s.llm.provider != "extractive")

    # -- components (after the pipeline started) ------------------------------
    @property
    def store(self) -> ConversationStore:
        if self._store is None:
            found = getattr(self.rag.store, "conversations", None)
            if not isinstance(found, ConversationStore):
                log.warning("the store keeps no conversations: they are kept in this process only")
                found = MemoryConversations()
            self._store = found
        return self._store

    def _cached_llm(self) -> CachedLLM:
        if self._llm is None:
            self._llm = CachedLLM(self.rag.llm, self.rag.cache, self.rag.settings.llm)
        return self._llm

    def count(self, text: str) -> int:
        return self.rag.chunker.count_tokens(text)

    # -- validation -------------------------------------------------------------
    def check_id(self, conversation_id: object) -> str:
        """A conversation id is 1-``max_id_chars`` of ``A-Z a-z 0-9 _ . : -`` starting with a letter or digit."""
        n = self.settings.max_id_chars
        if not isinstance(conversation_id, str) or len(conversation_id) > n or not _ID.fullmatch(conversation_id):
            raise InvalidInput(
                f"conversation_id must be a string of 1-{n} characters from A-Z a-z 0-9 _ . : - "
                f"(starting with a letter or digit), got {str(conversation_id)[:80]!r}"
            )
        return conversation_id

    # -- one turn ------------------------------------------------------------------
    async def prepare(
        self,
        tenant: str,
        question: str,
        *,
        conversation_id: str | None = None,
        history: Sequence[Message] = (),
        k: int | None = None,
        cache_mode: CacheMode = "default",
    ) -> Prepared:
        """Validate the turn, compress the history and condense the question (no answer yet)."""
        rag = self.rag
        build_query(rag.settings, question, k, tenant, (), cache_mode)  # the question's own limits, first
        await rag.start()
        summary, summarized = "", 0
        if conversation_id is not None:
            conv = await self.load(tenant, self.check_id(conversation_id))
            messages = [{"role": t.role, "content": t.content} for t in conv.turns] if conv else []
            standalones = [t.standalone or t.content for t in conv.turns if t.role == "user"] if conv else []
            if conv is not None:
                summary, summarized = conv.summary, conv.summarized
            if len(standalones) >= self.settings.max_turns:
                raise PayloadTooLarge(
                    f"conversation {conversation_id!r} has {len(standalones)} turns, the limit is "
                    f"{self.settings.max_turns} (conversation.max_turns); start a new conversation"
                )
        else:
            messages = list(history)
            standalones = self._rules_chain([m["content"] for m in messages if m["role"] == "user"])
        summary, summarized = await self._compress(tenant, conversation_id, messages, standalones, summary, summarized)
        recent = messages[summarized:]
        budget = self.settings.history_token_budget
        prompt_history = await asyncio.to_thread(cd.fit_history, summary, recent, self.count, budget)  # tokenizing
        standalone = await self._condense(tenant, question, prompt_history, standalones[-1] if standalones else "")
        keep = tuple(prompt_history) if self.settings.history_in_prompt else ()
        return Prepared(tenant, question, standalone, keep, conversation_id, len(standalones) + 1)

    def _rules_chain(self, questions: Sequence[str]) -> list[str]:
        """Standalone forms of a stateless history's user questions, each condensed from the one before."""
        out: list[str] = []
        limit = self.rag.settings.limits.max_query_chars
        for q in questions:
            out.append(cd.condense_rules(q, out[-1] if out else "", limit))
        return out

    async def _condense(self, tenant: str, question: str, history: list[Message], previous: str) -> str:
        limit = self.rag.settings.limits.max_query_chars
        if not history:
            return " ".join(question.split())
        if self.use_llm:
            try:
                done = await self._cached_llm().complete(tenant, cd.condense_messages(history, question))
                text = cd.clean_standalone(done.text, limit) if done.finish_reason != FALLBACK_FINISH else ""
                if text:
                    check_unicode(text, "standalone question")
                    return text
            except RaglineError as exc:  # the answer will say more if the model is down; retrieve anyway
                log.debug("condensation by the LLM failed (%s): rules instead", exc.code)
        return cd.condense_rules(question, previous, limit)

    async def _compress(
        self,
        tenant: str,
        conversation_id: str | None,
        messages: list[Message],
        standalones: list[str],
        summary: str,
        summarized: int,
    ) -> tuple[str, int]:
        """Fold the oldest unsummarised turns into the summary while the history is over its budget."""
        s = self.settings
        count = self.count
        summary_cost = cd.message_cost({"role": "assistant", "content": cd.SUMMARY_PREFIX + summary}, count)
        fold = await asyncio.to_thread(  # tokenizing is CPU work: off the event loop
            cd.plan_fold, messages[summarized:], summary_cost if summary else 0, count, s.history_token_budget
        )
        if fold == 0:
            return summary, summarized
        folded = messages[summarized : summarized + fold]
        asked = [m for m in messages[:summarized] if m["role"] == "user"]
        folded_standalones = standalones[len(asked) : len(asked) + sum(m["role"] == "user" for m in folded)]
        new = ""
        if self.use_llm:
            try:
                words = max(10, s.summary_token_budget * 3 // 4)
                done = await self._cached_llm().complete(tenant, cd.summary_messages(summary, folded, words))
                if done.finish_reason != FALLBACK_FINISH:
                    new = cd.clip_tokens(" ".join(done.text.split()), count, s.summary_token_budget)
            except RaglineError as exc:
                log.debug("summary by the LLM failed (%s): extractive instead", exc.code)
        if not new:
            new = await asyncio.to_thread(
                cd.summarize_rules, summary, folded, folded_standalones, count, s.summary_token_budget
            )
        if conversation_id is not None:
            await asyncio.to_thread(self.store.set_summary, tenant, conversation_id, new, summarized + fold)
        return new, summarized + fold

    async def record(self, p: Prepared, answer: str, sources: Sequence[dict[str, Any]]) -> None:
        """Store the turn (question and answer) in its conversation; nothing for a stateless request."""
        if p.conversation_id is None:
            return
        s = self.settings
        cited = tuple(
            {
                "doc_id": str(h.get("doc_id", "")),
                "chunk_id": str(h.get("chunk_id", "")),
                "title": str(h.get("title", "")),
            }
            for h in sources
        )
        turns = [Turn("user", p.question, p.standalone), Turn("assistant", answer, sources=cited)]
        await asyncio.to_thread(
            self.store.append,
            p.tenant,
            p.conversation_id,
            turns,
            max_messages=2 * s.max_turns,
            max_conversations=s.max_conversations_per_tenant,
        )
        self._appends += 1
        if self._appends % 100 == 1:  # idle conversations expire (at most 1,000 per pass)
            await asyncio.to_thread(self.store.prune, s.ttl_s)

    # -- answers ----------------------------------------------------------------------
    async def ask(
        self,
        question: str,
        *,
        tenant: str = DEFAULT_TENANT,
        conversation_id: str | None = None,
        history: Sequence[Message] = (),
        k: int | None = None,
        cache_mode: CacheMode = "default",
    ) -> dict[str, Any]:
        """One turn from Python: ``{conversation, cache, answer, sources, usage, model}`` as ``/v1/query``
        answers it (``history`` is checked as ``/v1/query`` checks it)."""
        hist = check_history(history, self.rag.settings.limits.max_history_messages) if history else ()
        p = await self.prepare(
            tenant, question, conversation_id=conversation_id, history=hist, k=k, cache_mode=cache_mode
        )
        body, info = await self.ask_body(p, k, cache_mode, None)
        out: dict[str, Any] = {"conversation": p.info(), "cache": info.to_dict(), **orjson.loads(body)}
        return out

    async def ask_body(
        self, p: Prepared, k: int | None, cache_mode: CacheMode, timings: dict[str, float] | None
    ) -> tuple[bytes, CacheInfo]:
        """The pipeline's answer to the standalone question (every cache applies), with the turn recorded."""
        body, info = await self.rag.ask_body(
            p.standalone, k, p.tenant, history=p.history, cache_mode=cache_mode, timings=timings
        )
        if p.conversation_id is not None:
            d = orjson.loads(body)
            await self.record(p, d["answer"], d["sources"])
        return body, info

    async def ask_stream(self, p: Prepared, k: int | None, cache_mode: CacheMode) -> AsyncIterator[Event]:
        """The pipeline's events for the standalone question; the turn is recorded before ``done``."""
        events = await self.rag.ask_stream(p.standalone, k, p.tenant, history=p.history, cache_mode=cache_mode)
        return self._recording(p, events)

    async def _recording(self, p: Prepared, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
        text: list[str] = []
        sources: list[dict[str, Any]] = []
        async for name, data in events:
            if name == "sources":
                sources = data["sources"]
            elif name == "delta":
                text.append(data["text"])
            elif name == "done":
                await self.record(p, "".join(text), sources)
            yield name, data

    # -- the conversations API ------------------------------------------------------------
    async def load(self, tenant: str, conversation_id: str) -> Conversation | None:
        await self.rag.start()
        return await asyncio.to_thread(self.store.get, tenant, self.check_id(conversation_id))

    async def get(self, tenant: str, conversation_id: str) -> dict[str, Any]:
        """``GET /v1/conversations/{id}``: every turn and the summary; ``NotFound`` for another tenant's id."""
        conv = await self.load(tenant, conversation_id)
        if conv is None:
            raise NotFound(f"no conversation {conversation_id!r} for this API key's tenant")
        return {
            "id": conv.id,
            "created_at": conv.created_at,
            "updated_at": conv.updated_at,
            "turns": sum(t.role == "user" for t in conv.turns),
            "messages": [t.to_dict() for t in conv.turns],
            "summary": conv.summary,
            "summarized_messages": conv.summarized,
            "expires_at": round(conv.updated_at + self.settings.ttl_s, 3),
            "now": round(time.time(), 3),
        }

    async def delete(self, tenant: str, conversation_id: str) -> None:
        await self.rag.start()
        if not await asyncio.to_thread(self.store.delete, tenant, self.check_id(conversation_id)):
            raise NotFound(f"no conversation {conversation_id!r} for this API key's tenant")
