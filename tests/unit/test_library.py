"""The library surface: ``ask_many`` (order, concurrency bound, single-flight, errors), the sync ``RAG``
having every public method of ``AsyncRAG`` (and ``ask_stream`` as an iterator), per-kind TTLs applied to
each kind's entries, and profiles beneath explicit settings."""

from __future__ import annotations

import inspect
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ragline import RAG, AsyncRAG, ConfigError, InvalidInput, Settings
from ragline.cache.keys import kind_of
from ragline.canonical import query_form
from ragline.profiles import PROFILES
from ragline.testing import HashEmbedder, ScriptedLLM
from ragline.types import Answer, Document, Query

DOCS = [
    Document("paris", "Paris is the capital of France. The Eiffel Tower opened in 1889.", "Paris"),
    Document("cats", "Domestic cats sleep for sixteen hours a day and purr when content.", "Cats"),
    Document("tea", "Green tea contains caffeine and antioxidants called catechins.", "Tea"),
]
QUESTIONS = [f"question {i} about cats and tea?" for i in range(8)]
ROOT = Path(__file__).resolve().parents[2]


def _settings(tmp_path: Path, **cache: object) -> Settings:
    return Settings(data_dir=tmp_path / "data", cache={"redis_url": None, **cache})


@pytest.fixture
async def slow_rag(tmp_path: Path) -> AsyncIterator[tuple[AsyncRAG, ScriptedLLM]]:
    llm = ScriptedLLM(delay_s=0.03)
    async with AsyncRAG(_settings(tmp_path), embedder=HashEmbedder(), llm=llm) as rag:
        await rag.ingest(DOCS)
        yield rag, llm


# --------------------------------------------------------------------------- ask_many
async def test_ask_many_keeps_input_order_and_bounds_concurrency(slow_rag: tuple[AsyncRAG, ScriptedLLM]) -> None:
    rag, llm = slow_rag
    answers = await rag.ask_many(QUESTIONS, max_concurrent=3)
    # ScriptedLLM echoes the question the pipeline works with: its canonical query form (no trailing "?")
    assert [a.text.split("'")[1] for a in answers] == [query_form(q) for q in QUESTIONS]
    assert llm.calls == len(QUESTIONS) and 2 <= llm.max_in_flight <= 3
    again = await rag.ask_many(QUESTIONS, max_concurrent=3)
    assert [a.cache.kind for a in again] == ["exact"] * len(QUESTIONS) and llm.calls == len(QUESTIONS)


async def test_ask_many_identical_queries_share_one_computation(slow_rag: tuple[AsyncRAG, ScriptedLLM]) -> None:
    rag, llm = slow_rag
    answers = await rag.ask_many(["When did the Eiffel Tower open?"] * 6 + [Query("What do cats do?", k=2)])
    assert llm.calls == 2 and len({a.text for a in answers[:6]}) == 1
    assert "cats" in answers[6].text.lower()


async def test_ask_many_errors_raise_or_stand_in_place(slow_rag: tuple[AsyncRAG, ScriptedLLM]) -> None:
    rag, _ = slow_rag
    with pytest.raises(InvalidInput):
        await rag.ask_many(["fine question?", "", "another one?"])
    mixed = await rag.ask_many(["fine question?", "", "another one?"], return_exceptions=True)
    assert isinstance(mixed[0], Answer) and isinstance(mixed[1], InvalidInput) and isinstance(mixed[2], Answer)
    for bad in (0, -1, 10_000):
        with pytest.raises(InvalidInput, match="max_concurrent"):
            await rag.ask_many(["q?"], max_concurrent=bad)
    assert await rag.ask_many([]) == []


async def test_ask_many_default_bound_is_the_admission_limit(tmp_path: Path) -> None:
    llm = ScriptedLLM(delay_s=0.02)
    s = Settings(data_dir=tmp_path / "d", cache={"redis_url": None}, limits={"max_concurrent_work": 2})
    async with AsyncRAG(s, embedder=HashEmbedder(), llm=llm) as rag:
        await rag.ingest(DOCS)
        assert len(await rag.ask_many(QUESTIONS)) == len(QUESTIONS)
        assert llm.max_in_flight <= 2


# --------------------------------------------------------------------------- the sync facade
def _public(cls: type) -> set[str]:
    return {n for n, v in inspect.getmembers(cls) if not n.startswith("_") and (callable(v) or isinstance(v, property))}


def test_sync_facade_has_every_public_method_of_the_async_pipeline() -> None:
    renamed = {"aclose": "close"}
    expected = {renamed.get(n, n) for n in _public(AsyncRAG)}
    missing = expected - _public(RAG)
    assert not missing, f"RAG lacks {sorted(missing)}: add blocking twins in ragline/facade.py"
    for name in expected - {"close", "embedder", "store", "llm", "chunker", "function_cache"}:
        a, s = getattr(AsyncRAG, {v: k for k, v in renamed.items()}.get(name, name)), getattr(RAG, name)
        if callable(a) and callable(s):  # same parameters (the names users pass by keyword)
            assert list(inspect.signature(a).parameters) == list(inspect.signature(s).parameters), name


def test_sync_facade_end_to_end(tmp_path: Path) -> None:
    llm = ScriptedLLM()
    with RAG(_settings(tmp_path), embedder=HashEmbedder(), llm=llm) as rag:
        assert rag.ingest(DOCS).added == 3
        events = list(rag.ask_stream("When did the Eiffel Tower open?"))
        kinds = [e[0] for e in events]
        assert kinds[0] == "sources" and kinds[-1] == "done" and "delta" in kinds
        assert events[-1][1]["cache"]["kind"] == "miss"
        assert list(rag.ask_stream("When did the Eiffel Tower open?"))[-1][1]["cache"]["kind"] == "exact"
        with pytest.raises(InvalidInput):
            rag.ask_stream("")  # raises at the call, before any event
        stream = rag.ask_stream("What do cats do all day?")
        assert next(stream)[0] == "sources"
        stream.close()  # leaving early stops the generation
        answers = rag.ask_many(["What do cats do?", "What is in green tea?"], max_concurrent=2)
        assert [a.text.split("'")[1] for a in answers] == ["What do cats do", "What is in green tea"]
        body, info = rag.ask_body("What do cats do?")
        assert b"answer" in body and info.kind == "exact"
        assert rag.retrieve("green tea").hits[0].doc_id == "tea"
        assert rag.embed_query("tea").shape == (rag.embedder.dim,)
        assert rag.invalidate(tenant="default") >= 1
        assert rag.ask("What do cats do?").cache.kind == "miss"
        assert isinstance(rag.upstreams(), dict)
        rag.catch_up()
        assert rag.start() is rag and rag.ready and rag.settings.cache.redis_url is None
        assert rag.stats()["documents"] == 3


# --------------------------------------------------------------------------- per-kind TTLs
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_each_kind_expires_at_its_own_ttl(tmp_path: Path) -> None:
    ttls = {"answer": 100.0, "retrieval": 200.0, "embedding": 300.0, "llm": 400.0}
    s = _settings(tmp_path, l3_enabled=False, semantic=False, l1_max_ttl_s=10_000, ttls=ttls)
    llm = ScriptedLLM()
    async with AsyncRAG(s, embedder=HashEmbedder(), llm=llm) as rag:
        await rag.ingest(DOCS)
        assert rag.cache is not None and rag.cache.tiers.l1 is not None
        l1, clock = rag.cache.tiers.l1, Clock()
        l1._clock = clock
        await rag.invalidate(everything=True)
        await rag.ask("When did the Eiffel Tower open?")
        await rag.search("When did the Eiffel Tower open?")  # ask keeps its answer, search its retrieval
        await rag.cache.behind.drain()  # the retrieval entry is written behind the response
        expiry = {kind_of(k): exp - clock.now for k, (_, exp) in l1._data.items()}
        assert expiry == ttls
        for t, alive in ((150, {"retrieval", "embedding", "llm"}), (250, {"embedding", "llm"}), (350, {"llm"})):
            clock.now = 1000.0 + t
            assert {kind_of(k) for k in list(l1._data) if l1.get(k) is not None} == alive, t
        clock.now = 1000.0 + 150  # (expired entries are gone from L1 now; re-ask at 150 s)
        assert (await rag.ask("When did the Eiffel Tower open?")).cache.kind == "miss"
        assert llm.calls == 1  # the answer expired, the LLM response (400 s) had not: no second call


def test_ttl_settings_defaults_and_validation() -> None:
    cs = Settings().cache
    assert cs.ttl_for("answer") == cs.ttl_for("retrieval") == cs.ttl_for("llm") == cs.ttl_s == 86_400
    assert cs.ttl_for("embedding") == 7 * 86_400 and cs.ttl_for("function") == 3600
    assert Settings(cache={"ttl_s": 60}).cache.ttl_for("answer") == 60
    for bad in ({"ttls": {"answer": 0}}, {"ttls": {"llm": -1}}, {"ttls": {"embedding": 400 * 86_400}},
                {"ttls": {"answers": 5}}, {"ttl_s": 0}):  # fmt: skip
        with pytest.raises(ConfigError, match="cache"):
            Settings.load(cache=bad)


# --------------------------------------------------------------------------- profiles
def test_profile_applies_beneath_explicit_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = Settings()
    mem = Settings(profile="memory")
    assert (mem.cache.l1_max_bytes, mem.embedder.batch_size, mem.jobs.concurrency) == (8 * 2**20, 8, 1)
    both = Settings(profile="memory", cache={"l1_max_bytes": 1234})  # explicit wins, field by field
    assert both.cache.l1_max_bytes == 1234 and both.cache.redis_max_connections == 16
    monkeypatch.setenv("RAGLINE_PROFILE", "latency")
    monkeypatch.setenv("RAGLINE_EMBEDDER__MICRO_BATCH_WAIT_MS", "3")
    env = Settings()
    assert env.profile == "latency" and env.embedder.micro_batch_wait_ms == 3.0 and env.embedder.ingest_slice == 4
    assert Settings(profile=None).embedder.ingest_slice == base.embedder.ingest_slice  # an explicit None: none
    monkeypatch.delenv("RAGLINE_PROFILE")
    monkeypatch.delenv("RAGLINE_EMBEDDER__MICRO_BATCH_WAIT_MS")
    yml = tmp_path / "ragline.yaml"
    yml.write_text("profile: throughput\nembedder:\n  batch_size: 16\n")
    y = Settings.load(yml)
    assert (y.profile, y.embedder.batch_size, y.embedder.micro_batch_wait_ms) == ("throughput", 16, 5.0)
    monkeypatch.setenv("RAGLINE_CACHE__L1_MAX_BYTES", "999")  # env beats the YAML's profile too
    assert Settings.load(yml).cache.l1_max_bytes == 999
    with pytest.raises(ConfigError, match="profile"):
        Settings.load(profile="fast")


def test_profiles_never_change_answers_and_are_documented() -> None:
    fingerprint = Settings().fingerprint()
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Profiles") :]
    section = section[: section.index("\n## ")]
    for name, tree in PROFILES.items():
        assert Settings(profile=name).fingerprint() == fingerprint, name  # cached answers stay valid
        for sec, fields in tree.items():
            for field, value in fields.items():
                assert getattr(getattr(Settings(profile=name), sec), field) == value
                assert re.search(rf"`{sec}\.{field}`", section), f"README's profile table lacks {sec}.{field}"
