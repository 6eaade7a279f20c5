"""Loaders: every format, folder walking, limits, and validate_document."""

from __future__ import annotations

import io
from pathlib import Path

import orjson
import pytest

from ragline.config import LimitSettings
from ragline.errors import InvalidInput, PayloadTooLarge, RaglineError, UnsupportedFile
from ragline.ingest.loaders import (
    SUPPORTED_SUFFIXES,
    decode_text,
    html_to_text,
    iter_documents,
    iter_file,
    parse_bytes,
    validate_document,
)
from ragline.types import Document

LIMITS = LimitSettings()
SAMPLE_DOCS = Path(__file__).resolve().parents[2] / "examples" / "sample_docs"


def make_pdf(pages: list[str], title: str | None = None) -> bytes:
    """A minimal valid PDF with one line of Helvetica text per page (offsets computed)."""
    objs: list[bytes] = []
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(len(pages)))
    objs.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objs.append(f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode())
    objs.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    for i, text in enumerate(pages):
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
        objs.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {5 + 2 * i} 0 R >>".encode()
        )
        objs.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    info = None
    if title:
        objs.append(f"<< /Title ({title}) >>".encode())
        info = len(objs)
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, o in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + o + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    trailer = f"<< /Size {len(objs) + 1} /Root 1 0 R" + (f" /Info {info} 0 R" if info else "") + " >>"
    out += b"trailer\n" + trailer.encode() + b"\nstartxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


def load(path: Path, **kw: object) -> list[Document]:
    return list(iter_documents([path], LIMITS, **kw))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- formats


def test_txt(tmp_path: Path) -> None:
    p = tmp_path / "notes.txt"
    p.write_text("Plain text.\nSecond line.\n", encoding="utf-8")
    (doc,) = load(p)
    assert doc.id == "notes.txt"
    assert doc.title == "notes"
    assert doc.text == "Plain text.\nSecond line.\n"
    assert doc.source == str(p)
    assert doc.metadata == {}


def test_undecodable_text_never_crashes(tmp_path: Path) -> None:
    p = tmp_path / "legacy.txt"
    p.write_bytes("Café crème, naïve".encode("cp1252") + b"\x81\x8d")  # not UTF-8, not cp1252
    (doc,) = load(p)
    assert doc.text.startswith("Café crème, naïve")
    assert decode_text("ünïcode".encode()) == "ünïcode"
    assert decode_text(b"\xef\xbb\xbfbom") == "bom"
    assert decode_text("utf16 text".encode("utf-16")) == "utf16 text"
    assert decode_text(b"\x93quoted\x94") == "“quoted”"


def test_markdown_title_from_first_heading(tmp_path: Path) -> None:
    p = tmp_path / "guide.md"
    p.write_text("Intro line without heading.\n\n## Getting started ##\n\nText.\n\n# Later\n")
    (doc,) = load(p)
    assert doc.title == "Getting started"
    assert "Intro line" in doc.text
    p2 = tmp_path / "setext.markdown"
    p2.write_text("Big Title\n=========\n\nBody.\n")
    assert load(p2)[0].title == "Big Title"
    p3 = tmp_path / "plain.md"
    p3.write_text("no headings here\n")
    assert load(p3)[0].title == "plain"


def test_markdown_front_matter(tmp_path: Path) -> None:
    p = tmp_path / "fm.md"
    p.write_text('---\ntitle: "From front matter"\ntags: [a]\n---\n# Heading\n\nBody text.\n')
    (doc,) = load(p)
    assert doc.title == "From front matter"
    assert not doc.text.startswith("---")
    assert doc.text.startswith("# Heading")


def test_html(tmp_path: Path) -> None:
    p = tmp_path / "page.html"
    p.write_text(
        "<html><head><title>  The  Title </title><style>p{color:red}</style>"
        "<script>var secret = 1;</script></head><body>"
        "<nav>Home | About</nav><h1>Heading</h1>"
        "<p>First <b>bold</b>\n   paragraph &amp; more.<br>Next line.</p>"
        "<!-- a comment --><div>Second <a href='#'>block</a>.</div>"
        "<ul><li>one</li><li>two</li></ul><pre>  keep\n  spacing</pre>"
        "<script>alert('x')</script></body></html>"
    )
    (doc,) = load(p)
    assert doc.title == "The Title"
    assert doc.id == "page.html"
    assert "secret" not in doc.text and "alert" not in doc.text and "color" not in doc.text
    assert "Home" not in doc.text and "comment" not in doc.text
    assert "First bold paragraph & more.\nNext line." in doc.text
    assert "Heading\n\nFirst" in doc.text
    assert "Second block." in doc.text
    assert "one\n\ntwo" in doc.text
    assert "keep\nspacing" in doc.text  # <pre> keeps its line breaks


def test_html_title_fallbacks() -> None:
    assert html_to_text("<h1>Only H1</h1><p>x</p>")[0] == "Only H1"
    assert html_to_text("<p>x</p>") == ("", "x")
    deep = "<div>" * 3000 + "deep text" + "</div>" * 3000
    assert html_to_text(deep)[1] == "deep text"


def test_htm_title_falls_back_to_stem(tmp_path: Path) -> None:
    p = tmp_path / "untitled.htm"
    p.write_text("<p>Just a paragraph.</p>")
    (doc,) = load(p)
    assert doc.title == "untitled" and doc.text == "Just a paragraph."


def test_pdf(tmp_path: Path) -> None:
    p = tmp_path / "paper.pdf"
    p.write_bytes(make_pdf(["Hello PDF world.", "Second page here."], title="My Paper"))
    (doc,) = load(p)
    assert doc.text == "Hello PDF world.\n\nSecond page here."
    assert doc.title == "My Paper"
    p2 = tmp_path / "untitled.pdf"
    p2.write_bytes(make_pdf(["Only page."]))
    assert load(p2)[0].title == "untitled"


@pytest.mark.parametrize(
    "data",
    [
        b"%PDF-1.4\nthis is not really a pdf",
        b"\x00\x01garbage" * 50,
        b"",
    ],
)
def test_corrupt_pdf_is_unsupported_file(tmp_path: Path, data: bytes) -> None:
    p = tmp_path / "broken.pdf"
    p.write_bytes(data)
    with pytest.raises(UnsupportedFile, match=r"broken\.pdf"):
        load(p)


def test_encrypted_pdf(tmp_path: Path) -> None:
    from pypdf import PdfReader, PdfWriter

    reader = PdfReader(io.BytesIO(make_pdf(["Secret text."])))
    locked = PdfWriter(clone_from=reader)
    locked.encrypt(user_password="pw", algorithm="RC4-128")
    buf = io.BytesIO()
    locked.write(buf)
    p = tmp_path / "locked.pdf"
    p.write_bytes(buf.getvalue())
    with pytest.raises(UnsupportedFile, match="encrypted"):
        load(p)
    # Owner-password-only PDFs (empty user password) open fine.
    open_ = PdfWriter(clone_from=reader)
    open_.encrypt(user_password="", owner_password="owner", algorithm="RC4-128")
    buf = io.BytesIO()
    open_.write(buf)
    p2 = tmp_path / "restricted.pdf"
    p2.write_bytes(buf.getvalue())
    assert load(p2)[0].text == "Secret text."


def test_pdf_without_text_is_skipped(tmp_path: Path) -> None:
    p = tmp_path / "scan.pdf"
    p.write_bytes(make_pdf([""]))
    skipped: list[tuple[Path, str]] = []
    assert load(p, on_skip=lambda path, why: skipped.append((path, why))) == []
    assert skipped and "no extractable text" in skipped[0][1]


def test_jsonl_beir(tmp_path: Path) -> None:
    p = tmp_path / "corpus.jsonl"
    lines = [
        {"_id": "d1", "title": "One", "text": "First doc.", "metadata": {"year": 2020}},
        {"_id": 2, "title": "", "text": "Second doc."},
        {"_id": "d3", "title": "Only a title", "text": ""},
    ]
    p.write_bytes(b"\n".join(orjson.dumps(x) for x in lines) + b"\n\n")
    docs = load(p)
    assert [d.id for d in docs] == ["d1", "2", "d3"]
    assert docs[0].title == "One" and docs[0].metadata == {"year": 2020}
    assert docs[1].title == ""
    assert docs[2].text == "Only a title"
    assert all(d.source == str(p) for d in docs)


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        (b"{not json", "invalid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"title": "x", "text": "no id"}', "'_id'"),
        (b'{"_id": "a", "text": 5}', "'text'"),
        (b'{"_id": "a", "text": "x", "metadata": [1]}', "'metadata'"),
        (b'{"_id": "a\\nb", "text": "x"}', "control characters"),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path: Path, line: bytes, needle: str) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"_id": "ok", "text": "fine"}\n\n' + line + b"\n")
    with pytest.raises(InvalidInput) as ei:
        load(p)
    msg = ei.value.message
    assert "bad.jsonl line 3" in msg and needle in msg


def test_jsonl_empty_text_line_is_skipped_and_reported(tmp_path: Path) -> None:
    p = tmp_path / "c.jsonl"
    p.write_bytes(b'{"_id": "a", "text": "  "}\n{"_id": "b", "text": "real"}\n')
    skipped: list[str] = []
    docs = load(p, on_skip=lambda _p, why: skipped.append(why))
    assert [d.id for d in docs] == ["b"]
    assert skipped and "line 1" in skipped[0]


# --------------------------------------------------------------------------- folders and errors


def test_unsupported_extension_named_explicitly(tmp_path: Path) -> None:
    p = tmp_path / "report.docx"
    p.write_bytes(b"PK\x03\x04")
    with pytest.raises(UnsupportedFile) as ei:
        load(p)
    msg = ei.value.message
    assert "report.docx" in msg and "'.docx'" in msg
    for suffix in SUPPORTED_SUFFIXES:
        assert suffix in msg
    noext = tmp_path / "Makefile"
    noext.write_text("all:")
    with pytest.raises(UnsupportedFile, match="no file extension"):
        load(noext)


def test_folder_recursion_sorted_skipping_hidden(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("b text")
    (tmp_path / "a.md").write_text("# A\n\na text")
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "c.txt").write_text("c text")
    (tmp_path / "sub" / "deeper" / "d.html").write_text("<title>D</title><p>d text</p>")
    (tmp_path / "sub" / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "sub" / "empty.txt").write_text("  \n")
    (tmp_path / ".hidden.txt").write_text("hidden")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config.txt").write_text("hidden")
    (tmp_path / "sub" / ".cache").mkdir()
    (tmp_path / "sub" / ".cache" / "x.md").write_text("hidden")
    skipped: list[tuple[str, str]] = []
    docs = load(tmp_path, on_skip=lambda p, why: skipped.append((p.name, why)))
    assert [d.id for d in docs] == ["a.md", "b.txt", "sub/c.txt", "sub/deeper/d.html"]
    assert [d.title for d in docs] == ["A", "b", "c", "D"]
    assert all("hidden" not in d.text for d in docs)
    assert ("image.png", "unsupported file type '.png'") in skipped
    assert any(name == "empty.txt" for name, _ in skipped)
    # Stable across runs.
    assert [d.id for d in load(tmp_path)] == [d.id for d in docs]


def test_multiple_paths_and_single_path_argument(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("x")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "y.txt").write_text("y")
    docs = list(iter_documents([tmp_path / "x.txt", str(tmp_path / "d")], LIMITS))
    assert [d.id for d in docs] == ["x.txt", "y.txt"]
    assert [d.id for d in iter_documents(tmp_path / "x.txt", LIMITS)] == ["x.txt"]


def test_duplicate_ids_are_rejected(tmp_path: Path) -> None:
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "index.md").write_text(f"# {name}\n\ntext")
    with pytest.raises(InvalidInput, match=r"duplicate document id 'index\.md'"):
        list(iter_documents([tmp_path / "one", tmp_path / "two"], LIMITS))
    # The common parent gives unique ids.
    assert [d.id for d in iter_documents([tmp_path], LIMITS)] == ["one/index.md", "two/index.md"]
    c = tmp_path / "c.jsonl"
    c.write_bytes(b'{"_id": "a", "text": "x"}\n{"_id": "a", "text": "y"}\n{"_id": "b", "text": "z"}\n')
    errors: list[RaglineError] = []
    docs = list(iter_documents([c], LIMITS, on_error=lambda _p, e: errors.append(e)))
    assert [d.text for d in docs] == ["x", "z"]
    assert len(errors) == 1 and "duplicate" in errors[0].message


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="path not found"):
        load(tmp_path / "nope")


def test_errors_in_folder_raise_or_are_reported(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("fine")
    (tmp_path / "b.pdf").write_bytes(b"garbage")
    (tmp_path / "c.txt").write_text("also fine")
    with pytest.raises(UnsupportedFile):
        load(tmp_path)
    errors: list[tuple[str, RaglineError]] = []
    docs = load(tmp_path, on_error=lambda p, e: errors.append((p.name, e)))
    assert [d.id for d in docs] == ["a.txt", "c.txt"]
    assert errors[0][0] == "b.pdf" and isinstance(errors[0][1], UnsupportedFile)


def test_file_size_limit(tmp_path: Path) -> None:
    p = tmp_path / "big.txt"
    p.write_text("x" * 2000)
    small = LimitSettings(max_file_bytes=1000)
    with pytest.raises(PayloadTooLarge) as ei:
        list(iter_documents([p], small))
    assert "big.txt" in ei.value.message and "max_file_bytes" in ei.value.message
    assert list(iter_documents([p], LimitSettings(max_file_bytes=2000)))


def test_jsonl_document_limit_names_line(tmp_path: Path) -> None:
    p = tmp_path / "c.jsonl"
    p.write_bytes(b'{"_id": "a", "text": "short"}\n{"_id": "b", "text": "' + b"y" * 500 + b'"}\n')
    with pytest.raises(PayloadTooLarge, match=r"c\.jsonl line 2"):
        list(iter_documents([p], LimitSettings(max_document_bytes=100)))


def test_iter_file_custom_id(tmp_path: Path) -> None:
    p = tmp_path / "a.txt"
    p.write_text("hello")
    assert [d.id for d in iter_file(p, LIMITS, doc_id="custom/id")] == ["custom/id"]


def test_parse_bytes_for_uploads() -> None:
    (doc,) = parse_bytes(b"# Up\n\nloaded", "up.md", LIMITS)
    assert (doc.id, doc.title, doc.source) == ("up.md", "Up", "up.md")
    docs = parse_bytes(b'{"_id": "1", "text": "a"}\n{"_id": "2", "text": "b"}', "c.jsonl", LIMITS)
    assert [d.id for d in docs] == ["1", "2"]
    (pdf,) = parse_bytes(make_pdf(["Uploaded PDF."]), "u.pdf", LIMITS, doc_id="my-id")
    assert pdf.id == "my-id" and pdf.text == "Uploaded PDF."
    with pytest.raises(InvalidInput, match="no extractable text"):
        parse_bytes(b"   ", "e.txt", LIMITS)
    with pytest.raises(UnsupportedFile):
        parse_bytes(b"x", "x.exe", LIMITS)
    with pytest.raises(PayloadTooLarge):
        parse_bytes(b"x" * 20, "x.txt", LimitSettings(max_file_bytes=10))
    with pytest.raises(InvalidInput, match=r"c\.jsonl line 2"):
        parse_bytes(b'{"_id": "1", "text": "a"}\n{oops', "c.jsonl", LIMITS)


def test_sample_docs_load() -> None:
    skipped: list[str] = []
    docs = list(iter_documents([SAMPLE_DOCS], LIMITS, on_skip=lambda p, why: skipped.append(why)))
    assert not skipped
    assert len(docs) >= 8
    assert len({d.id for d in docs}) == len(docs)
    for d in docs:
        validate_document(d, LIMITS)
        assert d.title and len(d.text) > 200
    kinds = {Path(d.source).suffix for d in docs}
    assert {".md", ".txt", ".html", ".jsonl"} <= kinds


# --------------------------------------------------------------------------- validate_document


def doc(**kw: object) -> Document:
    base: dict[str, object] = {"id": "doc-1", "text": "Some text.", "title": "T", "metadata": {"a": 1}}
    base.update(kw)
    return Document(**base)  # type: ignore[arg-type]


def test_validate_ok() -> None:
    validate_document(doc(), LIMITS)
    validate_document(doc(id="x" * 512, metadata={}), LIMITS)
    validate_document(doc(id="ünï/cødé #1"), LIMITS)


def test_validate_empty_text() -> None:
    with pytest.raises(InvalidInput, match="document 'x' has empty text"):
        validate_document(doc(id="x", text="  \n\t"), LIMITS)
    with pytest.raises(InvalidInput, match="empty text"):
        validate_document(doc(id="x", text=""), LIMITS)


@pytest.mark.parametrize(
    ("bad_id", "needle"),
    [
        ("", "non-empty"),
        ("   ", "non-empty"),
        ("x" * 513, "513 characters; the maximum is 512"),
        ("a\nb", "control characters"),
        ("tab\there", "control characters"),
        ("nul\x00", "control characters"),
    ],
)
def test_validate_bad_ids(bad_id: str, needle: str) -> None:
    with pytest.raises(InvalidInput, match=needle) as ei:
        validate_document(doc(id=bad_id), LIMITS)
    assert type(ei.value) is InvalidInput


def test_validate_text_size_in_utf8_bytes() -> None:
    limits = LimitSettings(max_document_bytes=100)
    validate_document(doc(text="a" * 99, title="b"), limits)
    validate_document(doc(text="é" * 49, title="b"), limits)  # 98 + 1 bytes
    with pytest.raises(PayloadTooLarge, match="max_document_bytes"):
        validate_document(doc(text="é" * 50, title="b"), limits)  # 50 chars, 101 bytes
    with pytest.raises(PayloadTooLarge, match="'doc-1'"):
        validate_document(doc(text="a" * 1000), limits)


def test_validate_metadata() -> None:
    limits = LimitSettings(max_metadata_bytes=50)
    validate_document(doc(metadata={"k": "v"}), limits)
    with pytest.raises(PayloadTooLarge, match="max_metadata_bytes"):
        validate_document(doc(metadata={"k": "v" * 100}), limits)
    with pytest.raises(InvalidInput, match="not JSON-serialisable"):
        validate_document(doc(metadata={"k": object()}), LIMITS)
    with pytest.raises(InvalidInput, match="metadata must be a JSON object"):
        validate_document(doc(metadata=[1, 2]), LIMITS)
