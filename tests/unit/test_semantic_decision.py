"""The semantic accept decision: structure checks, the fitted model's mechanics, evidence verification."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ragline.cache.guards_structure import structure
from ragline.cache.semantic_decision import SIGNALS, decide, load_model, signals
from ragline.cache.semantic_match import evidence_holds, evidence_of
from ragline.config import CacheSettings

# --------------------------------------------------------------------------- structure checks


@pytest.mark.parametrize(
    ("a", "b", "check"),
    [
        ("Why do men earn more than women", "Why do women earn more than men", "antonym_swap"),
        ("Is it smart to buy high and sell low", "Is it smart to buy low and sell high", "antonym_swap"),
        ("Does he earn more than she does", "Does she earn more than he does", "antonym_swap"),  # stop words
        ("Why do people who don't smoke get cancer", "Why do people who smoke not get cancer", "negation_moved"),
        ("What does a nurse know", "What should a nurse know", "modal_one_side_must"),
        ("What will happen to the economy", "What happens to the economy", "modal_one_side_will"),
        ("How can I lose weight", "How do I lose weight", "modal_one_side_can"),
        ("Is this true", "Is the claim true", "deictic"),
        ("What does that mean", "What does the word mean", "deictic"),
        ("Are these safe to eat", "Are mushrooms safe to eat", "deictic"),
    ],
)
def test_structure_checks_flag_the_false_accept_patterns(a: str, b: str, check: str) -> None:
    assert structure(a, b)[check]
    assert structure(b, a)[check]  # symmetric


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Why do men earn more than women", "Why do men earn more than women nowadays"),
        ("Why can't I sleep at night", "Why cannot I sleep at night"),
        ("Why don't cats like water", "Why do cats not like water"),
        ("I think that the plan works: does it", "Does the plan work"),
        ("What is the capital of France", "Which city is the capital of France"),
    ],
)
def test_structure_checks_pass_same_structure(a: str, b: str) -> None:
    flags = structure(a, b)
    assert not flags["antonym_swap"] and not flags["negation_moved"] and not flags["deictic"], flags


# --------------------------------------------------------------------------- the model's mechanics


def _model(weight_on: str = "content_jaccard", vetoes: tuple[str, ...] = ("negation",), dim: int = 4) -> str:
    """A hand-made model file: probability rises with one signal; embedding features weigh nothing."""
    n_full = len(SIGNALS) + 2 * dim
    w = [0.0] * len(SIGNALS)
    w[SIGNALS.index(weight_on)] = 8.0
    lin = {"mean": [0.0] * len(SIGNALS), "scale": [1.0] * len(SIGNALS), "weights": w, "bias": -4.0}
    full = {"mean": [0.0] * n_full, "scale": [1.0] * n_full, "weights": w + [0.0] * 2 * dim, "bias": -4.0}
    return json.dumps(
        {
            "signals": list(SIGNALS),
            "dim": dim,
            "min_cosine": 0.8,
            "use_vectors": True,
            "vetoes": list(vetoes),
            "thresholds": {"balanced": 0.9, "strict": 0.99},
            "thresholds_signals_only": {"balanced": 0.9, "strict": 0.99},
            "full": full,
            "signals_only": lin,
        }
    )


def test_signals_are_named_and_bounded() -> None:
    sig = signals("How do I learn Python", "How can I learn Python", 0.95)
    assert sig.shape == (len(SIGNALS),)
    assert sig[0] == 0.95 and np.all((sig >= 0) & (sig <= 1))
    assert sig[SIGNALS.index("content_jaccard")] == 1.0  # same content words


def test_decide_applies_floor_vetoes_profiles_and_falls_back_without_vectors() -> None:
    m = load_model(_model())
    same, other = "How do I learn Python", "How can I learn Python"
    assert decide(m, "balanced", same, other, 0.95).accept  # content Jaccard 1: p = sigmoid(4)
    assert not decide(m, "strict", same, other, 0.95).accept  # sigmoid(4) = 0.982 < 0.99
    assert decide(m, "balanced", same, other, 0.79).reason == "cosine below semantic_min_cosine"
    assert decide(m, "balanced", "Is X safe", "Is X not safe", 0.97).reason == "negation"  # a hard veto
    assert not decide(m, "balanced", "How do I learn Python", "How do I cook rice", 0.9).accept
    u = np.ones(4, np.float32) / 2
    assert decide(m, 0.5, same, other, 0.95, u, u).accept  # a probability as the threshold
    wrong_dim = np.ones(8, np.float32)
    assert decide(m, "balanced", same, other, 0.95, wrong_dim, wrong_dim).accept  # signals-only model


def test_strict_is_stricter_than_balanced() -> None:
    m = load_model(_model())
    p = decide(m, "balanced", "How do I learn Python", "How can I learn Python", 0.95).probability
    assert m.threshold("strict", True) > m.threshold("balanced", True)
    assert (p >= m.threshold("strict", True)) == decide(
        m, "strict", "How do I learn Python", "How can I learn Python", 0.95
    ).accept


def test_a_model_of_other_signals_is_refused() -> None:
    d = json.loads(_model())
    d["signals"] = d["signals"][:-1]
    with pytest.raises(ValueError, match="semantic_fit"):
        load_model(json.dumps(d))


def test_the_committed_model_loads_and_matches_the_signals() -> None:
    m = load_model()
    assert m.full.weights.size == len(SIGNALS) + 2 * m.dim
    assert m.signals_only.weights.size == len(SIGNALS)
    assert 0 < m.threshold("balanced", True) < m.threshold("strict", True) <= 1
    assert set(m.vetoes) <= set(SIGNALS)


def test_per_tenant_profiles() -> None:
    cs = CacheSettings(semantic_tenant_threshold={"acme": "strict", "lab": 0.99})
    assert (cs.semantic_profile("acme"), cs.semantic_profile("lab"), cs.semantic_profile("x")) == (
        "strict",
        0.99,
        "balanced",
    )
    with pytest.raises(ValueError):
        CacheSettings(semantic_threshold=1.5)


# --------------------------------------------------------------------------- evidence verification


def _answer(text: str, ids: list[str]) -> dict[str, object]:
    return {"answer": text, "sources": [{"chunk_id": i} for i in ids]}


def test_evidence_is_what_the_answer_cites_else_its_top_sources() -> None:
    assert evidence_of(_answer("X rose [2]. Y fell [2][4]. [9]", ["a", "b", "c", "d"])) == ["b", "d"]
    assert evidence_of(_answer("no citation", ["a", "b", "c", "d", "e"])) == ["a", "b", "c"]
    assert evidence_of(_answer("", [])) == []


def test_evidence_must_be_in_the_fresh_context_and_hold_its_best_chunk() -> None:
    cached = _answer("X [1] and Y [2].", ["a", "b", "c", "d"])
    assert evidence_holds(cached, ["a", "b", "e", "f"])  # a tie at the bottom moved: still served
    assert evidence_holds(cached, ["b", "a"])  # another order
    assert not evidence_holds(cached, ["a", "c", "d"])  # cited b is gone from the fresh context
    assert not evidence_holds(cached, ["z", "a", "b"])  # the new query's best chunk was never seen
    assert not evidence_holds(cached, [])


# --------------------------------------------------------------------------- the default rule (guards)


def test_guard_rule_profiles_and_structure_vetoes() -> None:
    from ragline.cache.semantic_decision import guards_accept

    a, b = "How do I learn Python", "how do i learn python quickly"
    assert not guards_accept("balanced", a, b, 0.97)  # content differs: a feature guard
    same = "How can I reset my password"
    assert guards_accept("balanced", same, "How do I reset my password", 0.94)
    assert not guards_accept("strict", same, "How do I reset my password", 0.94)  # strict: tau 0.95
    assert guards_accept(0.9, same, "How do I reset my password", 0.91)  # a number is tau
    # the false accepts of issue 12, each vetoed by a structure check at any cosine
    assert not guards_accept("balanced", "Why do men earn more than women", "Why do women earn more than men", 0.99)
    assert not guards_accept("balanced", "Is this true", "Is this correct", 0.99)
    assert not guards_accept(
        "balanced", "Why do people who don't smoke get cancer", "Why do people who smoke not get cancer", 0.99
    )
