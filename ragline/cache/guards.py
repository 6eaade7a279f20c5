"""Guards for the semantic cache: may a cached answer serve a *different* query?

The semantic cache is a candidate generator, never the judge (DESIGN.md §3.2).
An ANN lookup proposes a cached query whose embedding is close to the new one
(cosine ≥ τ); sentence embeddings, however, are nearly blind to exactly the
details that change an answer.  These guards compare cheap lexical features of
both queries and veto the hit when such a detail differs:

========== ==============================================================
negation   "is X safe" / "is X not safe" (not, n't, never, without, no...)
numbers    "2016" / "2017", "10%" / "20%", "2nd" / "third" (normalised)
entities   "Union County" / "Morgan County", "IL-6" / "IL-10", "p53" / "p21"
qtype      who / when / where / why / how many / yes-no ("what" ≈ "how")
compound   one question / two questions ("What is X? How is it treated?")
polarity   advantages / disadvantages, increase / decrease, men / women
modality   should / could / will ("Should I use X" / "Could I use X")
person     I-we / you / someone ("if I murdered someone" / "if someone...")
deixis     "this sentence" / "the sentence" (points outside the query)
content    any content word one query has and the other lacks
order      roles swapped: "benzene into toluene" / "toluene into benzene"
========== ==============================================================

``content`` makes the decision close to "same content words, up to case,
punctuation, inflection, function words, clause order and a few filler words
(best, way, tips...)".  That is deliberate: on QQP, cosine alone never reaches
0.95 precision at any τ, and every looser guard set we measured fell below it;
the price is recall (about 14% of true paraphrases hit; see
``benchmarks/semantic_accuracy.py`` and ``benchmarks/results/semantic.json``).
A false rejection costs one LLM call, a false acceptance serves a wrong answer.

``extract_features`` runs once per query (regexes and small word lists, tens of
microseconds, no model) and its result can be stored next to the cached query;
``guards_pass`` compares two feature records (a few microseconds) and returns
``(ok, reason)`` so that rejections can be counted by reason.  Everything is
case- and punctuation-insensitive: "What is COVID-19?" and "what is covid 19"
have equal features.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

from ragline.cache.guards_words import (
    ALIASES,
    ANTONYM_PAIRS,
    AUX_ONE,
    AUX_START,
    DEICTIC,
    FILLER,
    HOW_QUANTITY,
    MODALS,
    NEGATION_WORDS,
    NUMBER_SUFFIX,
    ORDINAL_WORDS,
    PERSONS,
    QTYPE_CLASS,
    ROLE_WORDS,
    SCALES,
    STOPWORDS,
    SUBJECT_FORM,
    UNITS,
    WH_TYPES,
    WHAT_TIME,
)

__all__ = [
    "ALL_CHECKS",
    "ANTONYMS",
    "DEFAULT_CHECKS",
    "STOP_STEMS",
    "QueryFeatures",
    "extract_features",
    "guard_failures",
    "guards_pass",
]

# --------------------------------------------------------------------------- regexes

_TOKEN_RE = re.compile(r"[A-Za-z0-9$](?:[A-Za-z0-9+#%$]|['’.,/:\-](?=[A-Za-z0-9]))*[+#%]*")
_SENTENCE_BREAK_RE = re.compile(r"[.?!:;\"()\[\]]\s*$|^\s*$")
_NUMBER_RE = re.compile(
    r"^[$£€]?(?P<num>[-+]?\d[\d,]*(?:\.\d+)?)(?P<suf>%|k|m|mn|bn|b|st|nd|rd|th)?[$£€]?$", re.IGNORECASE
)
_NUMBER_START = frozenset("0123456789$£€+-")
_LETTER_RE = re.compile(r"[A-Za-z]")
_NUMBER_SPLIT_RE = re.compile(r"[-/:',]")
_QUESTION_RE = re.compile(r"\?+")
_FRACTION_RE = re.compile(r"^\d+(?:[/:]\d+)+$")
_CODE_RE = re.compile(r"[A-Za-z].*\d|\d.*[A-Za-z]")
_NO_ABBREV_RE = re.compile(r"\bno\.\s*\d", re.IGNORECASE)
_SPLIT_RE = re.compile(r"[-/.,:]")
_WORD_RE = re.compile(r"\b[A-Za-z]{2,}\b")
_CAPS_WORD_RE = re.compile(r"\b[A-Z]{2,}\b")
_NAME_NUMBER_RE = re.compile(r"^[A-Za-z]+-\d+(?:\.\d+)?$")
_DOTTED_RE = re.compile(r"^(?:[A-Za-z]\.){1,}[A-Za-z]\.?$")
_NON_CODE_RE = re.compile(r"[^a-z0-9+#]")
_CONTRACTION_RE = re.compile(r"'(?:s|m|re|ve|ll|d)$")
_NT_BASE = {"can't": "can", "won't": "will", "shan't": "shall", "ain't": "is"}

# --------------------------------------------------------------------------- features


@dataclass(frozen=True, slots=True)
class QueryFeatures:
    """Cheap lexical features of one query, stored alongside its cached answer.

    * ``negated`` — the query contains a negation cue (not, n't, never, without,
      no, none, nor, cannot...); idioms that do not negate ("or not", "why not",
      "not only", "no. 5") are ignored.
    * ``numbers`` — normalised numbers: ``"10000"`` (for "10,000", "10k", "ten
      thousand"), ``"2.5"``, ``"10%"``, ``"#2"`` for ordinals ("2nd", "second").
    * ``entities`` — stems of likely names: capitalised words not at a sentence
      start, acronyms, CamelCase, alphanumeric codes ("p53", "m604n", "s300");
      "COVID-19" counts as the name "covid" plus the number 19.
    * ``polarity`` — stems from an antonym lexicon (increase/decrease, male/female...).
    * ``qtype`` — who/what/when/where/why/how/quantity, ``yesno`` for questions
      opening with an auxiliary verb, ``other`` otherwise.
    * ``modality`` — modal classes used: ``must`` (should/must/ought/shall),
      ``can`` (can/could/may/might), ``will`` (will/would).
    * ``questions`` — number of question marks (a compound query asks more).
    * ``person`` — grammatical persons: ``1`` (I/my/we/our), ``2`` (you/your),
      ``indef`` (someone/anyone/"does one").
    * ``deixis`` — "this/these/those": the query points at something outside its text.
    * ``content`` — stems of content words (no stop, filler, negation or number words).
    * ``terms`` — every word stem in order, for entity coverage and role swaps.
    """

    negated: bool
    numbers: frozenset[str]
    entities: frozenset[str]
    polarity: frozenset[str]
    qtype: str
    modality: frozenset[str]
    questions: int
    person: frozenset[str]
    deixis: bool
    content: frozenset[str]
    terms: tuple[str, ...]


@lru_cache(maxsize=65536)
def stem(word: str) -> str:
    """A deliberately crude English stemmer: lower case, no possessive/plural/-ing/-ed.

    Both sides of a comparison use the same function, so consistency matters
    more than linguistic accuracy ("studying"/"study" and "uses"/"use" meet).
    """
    w = word.lower().replace("’", "'")
    if w.endswith("'s"):
        w = w[:-2]
    w = w.replace("'", "")
    n = len(w)
    if n <= 3 or not w.isalpha():
        return w
    if w.endswith("ies") and n > 4:
        return w[:-3] + "y"
    if w.endswith("ied") and n > 4:
        return w[:-3] + "y"
    if w.endswith("ness") and n > 6:
        w = w[:-4]
        n -= 4
    elif w.endswith(("ence", "ance")) and n > 6:
        return w[:-2] + "t"  # "difference" -> "different", "importance" -> "important"
    elif w.endswith("ly") and n > 5:
        w = w[:-2]
        n -= 2
    if w.endswith("ing") and n > 5:
        w = w[:-3]
    elif (w.endswith("ed") and n > 4) or w.endswith(("sses", "shes", "ches", "xes", "zes")):
        w = w[:-2]
    elif w.endswith("s") and not w.endswith(("ss", "us", "is")):
        w = w[:-1]
    if len(w) > 3 and w.endswith("e"):
        w = w[:-1]
    if len(w) > 3 and w[-1] == w[-2] and w[-1] not in "aeiouls":
        w = w[:-1]  # "stopped" -> "stopp" -> "stop"
    return w


_ANTONYMS: dict[str, frozenset[str]] = {}
for _x, _y in ANTONYM_PAIRS:
    _sx, _sy = stem(_x), stem(_y)
    _ANTONYMS[_sx] = _ANTONYMS.get(_sx, frozenset()) | {_sy}
    _ANTONYMS[_sy] = _ANTONYMS.get(_sy, frozenset()) | {_sx}
_STOP_STEMS = frozenset(stem(w) for w in STOPWORDS) | STOPWORDS
ANTONYMS = _ANTONYMS
"""stem → the stems of its antonyms (for :mod:`ragline.cache.guards_structure`)."""
STOP_STEMS = _STOP_STEMS
_FILLER_STEMS = frozenset(stem(w) for w in FILLER) | FILLER
_ROLE_STEMS = frozenset(stem(w) for w in ROLE_WORDS) | ROLE_WORDS


def _format_number(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6g}"


def _parse_number(token: str) -> str | None:
    """Normalise a numeric token, or return None if it is not one."""
    if _FRACTION_RE.match(token):
        return token
    m = _NUMBER_RE.match(token)
    if m is None:
        return None
    raw = m.group("num").replace(",", "")
    try:
        value = float(raw)
    except ValueError:
        return None
    suf = (m.group("suf") or "").lower()
    if suf in ("st", "nd", "rd", "th"):
        return f"#{_format_number(value)}"
    if suf == "%":
        return f"{_format_number(value)}%"
    value *= NUMBER_SUFFIX.get(suf, 1)
    return _format_number(value)


def _number_words(words: list[str], start: int) -> tuple[str | None, int]:
    """Parse a run of number words ("twenty five", "two hundred") starting at ``start``."""
    total = current = 0
    i = start
    seen = False
    while i < len(words):
        w = words[i]
        if w in UNITS:
            current += UNITS[w]
        elif w in SCALES and (seen or w != "hundred"):
            current = max(current, 1) * SCALES[w]
            if SCALES[w] > 100:
                total += current
                current = 0
        elif w in SCALES:
            current = SCALES[w]
        elif w == "and" and seen and i + 1 < len(words) and words[i + 1] in UNITS:
            i += 1
            continue
        else:
            break
        seen = True
        i += 1
    if not seen:
        return None, start
    return _format_number(total + current), i


def _is_sentence_start(text: str, start: int) -> bool:
    return start == 0 or bool(_SENTENCE_BREAK_RE.search(text[max(0, start - 3) : start]))


def _is_clause_start(text: str, start: int) -> bool:
    """Sentence start, or after a comma: "If I have X, can I Y?" is a yes/no question."""
    return _is_sentence_start(text, start) or text[max(0, start - 2) : start].rstrip().endswith(",")


def extract_features(text: str) -> QueryFeatures:
    """Compute the guard features of ``text`` (a user query); pure and fast.

    Numbers, negations and question type come from word lists and regexes; no
    model is loaded.  The result depends only on ``text``.
    """
    negations = 0
    numbers: set[str] = set()
    entities: set[str] = set()
    terms: list[str] = []
    qtype = ""
    person: set[str] = set()
    caps = _CAPS_WORD_RE.findall(text)
    shouting = len(caps) >= 3 and len(caps) > 0.6 * len(_WORD_RE.findall(text))

    matches = list(_TOKEN_RE.finditer(text))
    words = [m.group().lower().replace("’", "'") for m in matches]
    skip_until = 0
    for idx, m in enumerate(matches):
        tok = m.group().replace("’", "'")
        low = words[idx]

        # -- contractions: "can't" -> can + negation, "I'm" -> I, "what's" -> what
        if "'" in low:
            if low.endswith("n't"):
                negations += 1
                low = _NT_BASE.get(low, low[:-3])
                tok = tok[: len(low)]
            else:
                cm = _CONTRACTION_RE.search(low)
                if cm is not None:
                    low = low[: cm.start()]
                    tok = tok[: cm.start()]
            if not low:
                continue
        elif low in NEGATION_WORDS and not _negation_idiom(words, idx, text, m.start()):
            negations += 1
        if low in PERSONS and tok != "US":
            person.add(PERSONS[low])
        elif low == "one" and idx > 0 and words[idx - 1] in AUX_ONE:
            person.add("indef")

        # -- question type: the first wh-word, or an auxiliary opening a sentence
        if not qtype:
            if low in WH_TYPES:
                qtype = WH_TYPES[low]
                nxt = words[idx + 1] if idx + 1 < len(words) else ""
                if qtype == "how" and nxt in HOW_QUANTITY:
                    qtype = "quantity"
                elif qtype == "how" and nxt == "come":
                    qtype = "why"
                elif qtype == "what" and nxt in WHAT_TIME:
                    qtype = "when"
            elif low in AUX_START and _is_clause_start(text, m.start()):
                qtype = "yesno"

        # -- numbers (digits, number words, ordinals)
        num = _parse_number(tok) if tok[0] in _NUMBER_START else None
        if num is not None:  # "10,000", "$5", "10k", "2nd", "10%", "3/4"
            numbers.add(num)
            terms.append(num)
            continue
        if tok[0] in _NUMBER_START and not _LETTER_RE.search(tok):
            for piece in _NUMBER_SPLIT_RE.split(tok):  # "$4.83/85", "5'2", "6-7"
                value = _parse_number(piece)
                if value is not None:
                    numbers.add(value)
                    terms.append(value)
            continue
        if idx < skip_until:
            continue  # inside a run of number words already parsed
        if (low in UNITS or low in SCALES) and low != "one":
            value, skip_until = _number_words(words, idx)
            if value is not None:
                numbers.add(value)
                terms.append(value)
                continue
        if low in ORDINAL_WORDS:  # "second" too: "a second chance" and "2nd chance" must agree
            numbers.add(f"#{ORDINAL_WORDS[low]}")
            terms.append(f"#{ORDINAL_WORDS[low]}")
            continue

        # -- alphanumeric codes and dotted acronyms are entities as a whole; a
        #    hyphenated name-number ("COVID-19", "IL-6") is split like "Covid 19"
        if (_CODE_RE.search(tok) and not _NAME_NUMBER_RE.match(tok)) or _DOTTED_RE.match(tok):
            code = _NON_CODE_RE.sub("", low)
            code = ALIASES.get(code, code) if "." in tok else code
            if code:
                entities.add(code)
                terms.append(code)
            continue
        for part in _SPLIT_RE.split(tok):
            if not part:
                continue
            num = _parse_number(part) if part[0] in _NUMBER_START else None
            if num is not None:
                numbers.add(num)
                terms.append(num)
                continue
            plow = part.lower()
            s = ALIASES[plow] if part.isupper() and plow in ALIASES else SUBJECT_FORM.get(plow) or stem(plow)
            terms.append(s)
            if shouting or len(part) < 2 or part.islower():
                continue
            upper = sum(map(str.isupper, part))
            if upper == 0:
                continue
            acronym = upper >= 2 and part.isupper()
            if not acronym and (plow in STOPWORDS or s in _STOP_STEMS):
                continue
            camel = not part[0].isupper() or (upper >= 2 and not acronym)
            if acronym or camel or not _is_sentence_start(text, m.start()):
                entities.add(s)

    return QueryFeatures(
        negated=negations > 0,
        numbers=frozenset(numbers),
        entities=frozenset(entities),
        polarity=frozenset(t for t in terms if t in _ANTONYMS),
        qtype=qtype or "other",
        modality=frozenset(MODALS[t] for t in terms if t in MODALS),
        questions=len(_QUESTION_RE.findall(text)),
        person=frozenset(person),
        deixis=any(t in DEICTIC for t in terms),
        content=frozenset(
            t
            for t in terms
            if t not in _STOP_STEMS
            and t not in _FILLER_STEMS
            and t not in NEGATION_WORDS
            and not t[0].isdigit()
            and t[0] != "#"
        ),
        terms=tuple(terms),
    )


def _negation_idiom(words: list[str], idx: int, text: str, offset: int) -> bool:
    """Negation words that do not negate: "or not", "why not", "not only", "no. 5"."""
    w = words[idx]
    prev = words[idx - 1] if idx > 0 else ""
    nxt = words[idx + 1] if idx + 1 < len(words) else ""
    if w == "not":
        return prev in ("or", "why", "if") or nxt == "only"
    if w == "no":
        return bool(_NO_ABBREV_RE.match(text, offset)) or nxt == "matter"
    return False


# --------------------------------------------------------------------------- guards

ALL_CHECKS = (
    "negation", "numbers", "entities", "qtype", "compound", "polarity", "modality", "person",
    "deixis", "content", "order",
)  # fmt: skip
DEFAULT_CHECKS = ALL_CHECKS
_MAX_SWAP_TERMS = 40


def _entity_gap(a: QueryFeatures, b_terms: frozenset[str]) -> list[str]:
    return sorted(e for e in a.entities if e not in b_terms)


def _polarity_conflict(a: frozenset[str], b: frozenset[str]) -> str | None:
    """A word in one query whose antonym is in the other (and not its own side)."""
    for w in a - b:
        for x in _ANTONYMS[w]:
            if x in b:
                return f"{w}/{x}"
    for w in b - a:
        for x in _ANTONYMS[w]:
            if x in a:
                return f"{x}/{w}"
    return None


def _swapped(a: tuple[str, ...], b: tuple[str, ...]) -> str | None:
    """Two content terms that trade places around a shared pivot word.

    "convert benzene into toluene" / "convert toluene into benzene": benzene
    comes before "into" and toluene after it in one query, the reverse in the
    other.  A moved clause ("if X, can I Y" / "can I Y if X") keeps each term on
    the same side of every pivot and passes.  Only the first
    ``_MAX_SWAP_TERMS`` shared terms are examined.
    """
    pos_a: dict[str, int] = {}
    pos_b: dict[str, int] = {}
    dup: set[str] = set()
    for i, t in enumerate(a):
        if t in pos_a:
            dup.add(t)
        pos_a[t] = i
    for i, t in enumerate(b):
        if t in pos_b:
            dup.add(t)
        pos_b[t] = i
    shared = [t for t in pos_a if t in pos_b and t not in dup]
    if len(shared) < 3:
        return None
    shared.sort(key=pos_a.__getitem__)
    del shared[_MAX_SWAP_TERMS:]  # the search is cubic; queries rarely have this many words
    content = [t for t in shared if t not in _STOP_STEMS or t in _ROLE_STEMS]
    for i, x in enumerate(content):
        for y in content[i + 1 :]:
            if pos_b[y] >= pos_b[x]:
                continue
            lo, hi = pos_a[x], pos_a[y]
            lob, hib = pos_b[y], pos_b[x]
            for p in shared:
                if lo < pos_a[p] < hi and lob < pos_b[p] < hib:
                    return f"{x}/{y}"
    return None


def guards_pass(a: QueryFeatures, b: QueryFeatures, checks: Iterable[str] = DEFAULT_CHECKS) -> tuple[bool, str]:
    """Decide whether the answer cached for one query may serve the other.

    Symmetric in its decision.  Returns ``(True, "")`` or ``(False, reason)``
    where the reason names the first failing check: "negation differs",
    "numbers differ: {2016, 2017}", "entities differ: {java, python}",
    "question type differs: how/why", "question count differs: 1/2",
    "polarity differs: advantag/disadvantag", "modality differs: can/must",
    "person differs: 1/2", "deixis differs (this/these)", "content differs:
    {latest}" or "roles swapped: benzen/toluen".  ``checks`` selects a subset
    of ``ALL_CHECKS`` (ablations; ``CacheSettings.semantic_guard_checks``).
    """
    enabled = checks if isinstance(checks, (frozenset, set, tuple, list)) else tuple(checks)
    for name in ALL_CHECKS:
        if name in enabled:
            reason = _CHECKS[name](a, b)
            if reason:
                return False, reason
    return True, ""


def guard_failures(a: QueryFeatures, b: QueryFeatures) -> tuple[bool, ...]:
    """For each of :data:`ALL_CHECKS`, in order: would that check alone reject the pair?  (The
    semantic decision's features: every check evaluated once, no early exit.)"""
    return tuple(bool(_CHECKS[name](a, b)) for name in ALL_CHECKS)


def _negation(a: QueryFeatures, b: QueryFeatures) -> str:
    return "negation differs" if a.negated != b.negated else ""


def _numbers(a: QueryFeatures, b: QueryFeatures) -> str:
    if a.numbers == b.numbers:
        return ""
    return f"numbers differ: {{{', '.join(sorted(a.numbers ^ b.numbers))}}}"


def _entities(a: QueryFeatures, b: QueryFeatures) -> str:
    if not (a.entities or b.entities):
        return ""
    missing = _entity_gap(a, frozenset(b.terms)) + _entity_gap(b, frozenset(a.terms))
    return f"entities differ: {{{', '.join(missing)}}}" if missing else ""


def _qtype(a: QueryFeatures, b: QueryFeatures) -> str:
    if QTYPE_CLASS.get(a.qtype, a.qtype) == QTYPE_CLASS.get(b.qtype, b.qtype):
        return ""
    return f"question type differs: {a.qtype}/{b.qtype}"


def _compound(a: QueryFeatures, b: QueryFeatures) -> str:
    if (a.questions > 1) == (b.questions > 1):
        return ""
    return f"question count differs: {a.questions}/{b.questions}"


def _polarity(a: QueryFeatures, b: QueryFeatures) -> str:
    conflict = _polarity_conflict(a.polarity, b.polarity) if a.polarity or b.polarity else None
    return f"polarity differs: {conflict}" if conflict else ""


def _modality(a: QueryFeatures, b: QueryFeatures) -> str:
    if not (a.modality and b.modality and a.modality != b.modality):
        return ""
    return f"modality differs: {'+'.join(sorted(a.modality))}/{'+'.join(sorted(b.modality))}"


def _person(a: QueryFeatures, b: QueryFeatures) -> str:
    if a.person == b.person:
        return ""
    return f"person differs: {'+'.join(sorted(a.person)) or '-'}/{'+'.join(sorted(b.person)) or '-'}"


def _deixis(a: QueryFeatures, b: QueryFeatures) -> str:
    return "deixis differs (this/these)" if a.deixis != b.deixis else ""


def _content(a: QueryFeatures, b: QueryFeatures) -> str:
    if a.content == b.content:
        return ""
    return f"content differs: {{{', '.join(sorted(a.content ^ b.content))}}}"


def _order(a: QueryFeatures, b: QueryFeatures) -> str:
    swap = _swapped(a.terms, b.terms)
    return f"roles swapped: {swap}" if swap else ""


_CHECKS: dict[str, Callable[[QueryFeatures, QueryFeatures], str]] = {
    "negation": _negation,
    "numbers": _numbers,
    "entities": _entities,
    "qtype": _qtype,
    "compound": _compound,
    "polarity": _polarity,
    "modality": _modality,
    "person": _person,
    "deixis": _deixis,
    "content": _content,
    "order": _order,
}
