"""Turn files and folders into ``Document`` values, and validate documents.

Supported types: plain text (``.txt``), Markdown (``.md``, ``.markdown``),
HTML (``.html``, ``.htm``), PDF (``.pdf``) and BEIR-style JSONL corpora
(``.jsonl``: one ``{"_id", "title", "text", "metadata"}`` object per line, each
line one document).

Ids are stable across runs so that re-ingesting a folder updates documents in
place instead of duplicating them: a file inside a folder is identified by its
path relative to that folder (``guides/intro.md``), a file named directly by
its file name, and a JSONL line by its ``_id``.

Error policy (every error is a ``RaglineError`` with a message that says what
to fix):

* a file named explicitly whose type is unsupported → ``UnsupportedFile``;
  inside a folder such files are skipped and reported to ``on_skip``;
* a file that cannot be read (corrupt or encrypted PDF, a bad JSONL line, a
  file over ``limits.max_file_bytes``) raises, unless ``on_error`` is given, in
  which case it is reported there and the walk goes on with the next file;
* a file with no text at all (empty, or a scanned PDF) is skipped and
  reported to ``on_skip``: it is not an error to have an empty placeholder file.

Text files are decoded as UTF-8 (BOM-aware), then UTF-16 when a UTF-16 BOM is
present, then Windows-1252, then Latin-1, which never fails: a stray byte never
crashes an ingest.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from ragline.config import LimitSettings
from ragline.errors import InvalidInput, PayloadTooLarge, RaglineError, UnsupportedFile
from ragline.types import Document
from ragline.validate import check_unicode

__all__ = [
    "MAX_ID_CHARS",
    "SUPPORTED_SUFFIXES",
    "ErrorHandler",
    "SkipHandler",
    "decode_text",
    "html_to_text",
    "iter_documents",
    "iter_file",
    "parse_bytes",
    "validate_document",
]

SUPPORTED_SUFFIXES: tuple[str, ...] = (".htm", ".html", ".jsonl", ".markdown", ".md", ".pdf", ".txt")
"""File name suffixes ragline can ingest (lower case)."""

MAX_ID_CHARS = 512
"""Longest accepted document id, in characters."""

SkipHandler = Callable[[Path, str], None]
"""Called with (path, reason) for a file that was skipped without an error."""

ErrorHandler = Callable[[Path, RaglineError], None]
"""Called with (path, error) for a file that could not be loaded; the walk continues."""

_SUPPORTED_LIST = ", ".join(SUPPORTED_SUFFIXES)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


# --------------------------------------------------------------------------- helpers


def _show(value: str, limit: int = 60) -> str:
    """A short printable form of a user value for error messages."""
    return repr(value if len(value) <= limit else value[:limit] + "…")


def _mb(n: int) -> str:
    return f"{n / 1_000_000:.1f} MB" if n >= 100_000 else f"{n:,} bytes"


def decode_text(data: bytes) -> str:
    """Decode file bytes without ever failing.

    UTF-8 (a leading BOM is dropped) first, UTF-16 if the data starts with a
    UTF-16 BOM, then Windows-1252 (common for legacy Western files), then
    Latin-1, which maps every byte.
    """
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            pass
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")


# --------------------------------------------------------------------------- formats

_ATX_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", re.MULTILINE)
_SETEXT_HEADING = re.compile(r"^ {0,3}(\S[^\n]*)\n {0,3}(?:=+|-+)[ \t]*$", re.MULTILINE)
_FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n(?:---|\.\.\.)[ \t]*(?:\r?\n|\Z)", re.DOTALL)
_FM_TITLE = re.compile(r"^title[ \t]*:[ \t]*(.+?)[ \t]*$", re.MULTILINE)


def _markdown(text: str, stem: str) -> tuple[str, str]:
    """(title, body) of a Markdown file: front-matter title, else the first heading, else the stem.

    A YAML front-matter block is removed from the body (it is configuration,
    not prose); the Markdown itself is kept verbatim, it reads fine as plain
    text and its headings help keyword search.
    """
    title = ""
    fm = _FRONT_MATTER.match(text)
    if fm:
        t = _FM_TITLE.search(fm.group(1))
        if t:
            title = t.group(1).strip().strip("\"'")
        text = text[fm.end() :]
    if not title:
        atx = _ATX_HEADING.search(text)
        setext = _SETEXT_HEADING.search(text)
        found = [m for m in (atx, setext) if m is not None]
        if found:
            first = min(found, key=lambda m: m.start())
            title = first.group(1).strip()
    return title or stem, text


_DROP_TAGS = frozenset({"script", "style", "nav", "noscript", "template", "svg", "iframe", "head", "object", "canvas"})
_BLOCK_TAGS = frozenset(
    {
        "address",
        "article",
        "aside",
        "blockquote",
        "body",
        "caption",
        "dd",
        "details",
        "dialog",
        "div",
        "dl",
        "dt",
        "fieldset",
        "figcaption",
        "figure",
        "footer",
        "form",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "header",
        "hr",
        "li",
        "main",
        "ol",
        "p",
        "pre",
        "section",
        "summary",
        "table",
        "tbody",
        "td",
        "tfoot",
        "th",
        "thead",
        "tr",
        "ul",
    }
)
_WS = re.compile(r"\s+")
_PARA_BREAKS = re.compile(r"[ \t]*\n[ \t\n]*")


def html_to_text(html: str) -> tuple[str, str]:
    """(title, text) of an HTML page.

    Drops scripts, styles, navigation and other non-prose elements; block
    elements become paragraph breaks, ``<br>`` a line break, and whitespace
    inside running text is collapsed (``<pre>`` keeps its line breaks).  The title is the
    ``<title>`` element, else the first ``<h1>``, else empty.
    """
    from selectolax.lexbor import LexborHTMLParser

    tree = LexborHTMLParser(html)
    title = ""
    node = tree.css_first("title")
    if node is not None:
        title = _WS.sub(" ", node.text(deep=True)).strip()
    if not title:
        h1 = tree.css_first("h1")
        if h1 is not None:
            title = _WS.sub(" ", h1.text(deep=True)).strip()
    root = tree.body if tree.body is not None else tree.root
    if root is None:
        return title, ""
    parts: list[str] = []
    # Iterative depth-first walk (deeply nested pages must not hit the recursion limit).
    # Stack items: (node, in_pre) to enter, or a str to emit on leaving a block element.
    stack: list[Any] = [(root, False)]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            parts.append(item)
            continue
        n, in_pre = item
        if n.is_text_node:
            t = n.text_content or ""
            parts.append(t if in_pre else _WS.sub(" ", t))
            continue
        if not n.is_element_node:
            continue
        tag = n.tag
        if tag in _DROP_TAGS:
            continue
        if tag == "br":
            parts.append("\n")
            continue
        block = tag in _BLOCK_TAGS
        if block:
            parts.append("\n\n")
            stack.append("\n\n")
        pre = in_pre or tag == "pre"
        children = list(n.iter(include_text=True))
        stack.extend((c, pre) for c in reversed(children))
    text = "".join(parts)
    text = _PARA_BREAKS.sub(lambda m: "\n\n" if m.group().count("\n") > 1 else "\n", text)
    return title, text.strip()


def _pdf(data: bytes, name: str) -> tuple[str, str]:
    """(title, text) of a PDF: page texts joined by blank lines; raises UnsupportedFile."""
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            try:
                ok = bool(reader.decrypt(""))
            except Exception:
                ok = False
            if not ok:
                raise UnsupportedFile(
                    f"PDF {_show(name)} is encrypted with a password; save a decrypted copy and ingest that"
                )
        title = ""
        try:
            meta = reader.metadata
            if meta is not None and meta.title:
                title = str(meta.title).strip()
        except Exception:
            title = ""
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
    except RaglineError:
        raise
    except Exception as exc:
        raise UnsupportedFile(
            f"cannot read PDF {_show(name)}: {type(exc).__name__}: {exc}; the file is corrupt or not a PDF"
        ) from None
    return title, "\n\n".join(p for p in pages if p)


def _jsonl_doc(line: bytes, lineno: int, name: str, source: str) -> Document | None:
    """One BEIR corpus line as a Document (None for a blank line); raises InvalidInput."""
    if not line.strip():
        return None
    where = f"{name} line {lineno}"
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"{where}: invalid JSON ({exc}); each line must be one JSON object") from None
    if not isinstance(obj, dict):
        raise InvalidInput(f"{where}: expected a JSON object with '_id' and 'text', got {type(obj).__name__}")
    raw_id = obj.get("_id", obj.get("id"))
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
        raise InvalidInput(f"{where}: missing or non-string '_id'; every line needs a unique '_id'")
    text = obj.get("text", "")
    title = obj.get("title", "") or ""
    metadata = obj.get("metadata") or {}
    if not isinstance(text, str):
        raise InvalidInput(f"{where}: 'text' must be a string")
    if not isinstance(title, str):
        raise InvalidInput(f"{where}: 'title' must be a string")
    if not isinstance(metadata, dict):
        raise InvalidInput(f"{where}: 'metadata' must be a JSON object")
    if not text.strip() and title.strip():
        text = title  # some BEIR corpora have title-only documents
    return Document(id=str(raw_id), text=text, title=title, metadata=metadata, source=source)


# --------------------------------------------------------------------------- parsing


def _file_too_large(name: str, size: int, limits: LimitSettings) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"file {_show(name)} is {_mb(size)}, over the limit of "
        f"{_mb(limits.max_file_bytes)} (limits.max_file_bytes); "
        "split it or raise the limit"
    )


def _suffix(name: str) -> str:
    return Path(name).suffix.lower()


def _check_supported(name: str) -> str:
    suffix = _suffix(name)
    if suffix not in SUPPORTED_SUFFIXES:
        kind = f"type {suffix!r}" if suffix else "type (no file extension)"
        raise UnsupportedFile(
            f"cannot ingest {_show(name)}: unsupported file {kind}; supported types: {_SUPPORTED_LIST}"
        )
    return suffix


def _single(data: bytes, name: str, suffix: str, doc_id: str, source: str) -> Document:
    """A non-JSONL file's bytes as one Document (the text may be empty)."""
    stem = Path(name).stem
    if suffix == ".pdf":
        title, text = _pdf(data, name)
    elif suffix in (".html", ".htm"):
        title, text = html_to_text(decode_text(data))
    elif suffix in (".md", ".markdown"):
        title, text = _markdown(decode_text(data), stem)
    else:
        title, text = "", decode_text(data)
    return Document(id=doc_id, text=text, title=title or stem, source=source)


def parse_bytes(
    data: bytes, filename: str, limits: LimitSettings, *, doc_id: str | None = None, source: str | None = None
) -> list[Document]:
    """Documents in an uploaded file's bytes (the HTTP upload path).

    ``filename`` selects the format by its suffix; ``doc_id`` defaults to the
    file name (ignored for JSONL, whose lines carry their ids).  Strict: every
    document is validated, and a file without text is an ``InvalidInput``.
    """
    suffix = _check_supported(filename)
    if len(data) > limits.max_file_bytes:
        raise _file_too_large(filename, len(data), limits)
    src = filename if source is None else source
    if suffix == ".jsonl":
        docs: list[Document] = []
        for lineno, line in enumerate(data.splitlines(), 1):
            doc = _jsonl_doc(line, lineno, filename, src)
            if doc is not None:
                _validate_in(doc, limits, f"{filename} line {lineno}")
                docs.append(doc)
        if not docs:
            raise InvalidInput(f"file {_show(filename)} contains no documents")
        return docs
    doc = _single(data, filename, suffix, doc_id or Path(filename).name, src)
    if not doc.text.strip():
        raise InvalidInput(
            f"file {_show(filename)} has no extractable text"
            + (" (a scanned PDF needs OCR first)" if suffix == ".pdf" else "")
        )
    validate_document(doc, limits)
    return [doc]


def _validate_in(doc: Document, limits: LimitSettings, where: str) -> None:
    """validate_document, with the file (and line) prefixed to the message."""
    try:
        validate_document(doc, limits)
    except InvalidInput as exc:
        raise type(exc)(f"{where}: {exc.message}") from None


def iter_file(
    path: str | Path, limits: LimitSettings, *, doc_id: str | None = None, on_skip: SkipHandler | None = None
) -> Iterator[Document]:
    """Documents of one file; ``doc_id`` defaults to the file name.

    JSONL is streamed line by line (a big corpus never sits in memory twice);
    other formats yield one document.  A file without text yields nothing and
    is reported to ``on_skip``.  Raises ``UnsupportedFile`` for an unknown
    suffix, ``PayloadTooLarge`` over ``limits.max_file_bytes``, and
    ``InvalidInput`` (naming the line) for a bad JSONL line.
    """
    p = Path(path)
    name = str(p)
    suffix = _check_supported(p.name)
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise InvalidInput(f"cannot read {_show(name)}: {exc.strerror or exc}") from None
    if size > limits.max_file_bytes:
        raise _file_too_large(name, size, limits)
    try:
        if suffix == ".jsonl":
            with p.open("rb") as fh:
                empty = True
                for lineno, line in enumerate(fh, 1):
                    doc = _jsonl_doc(line, lineno, name, name)
                    if doc is None:
                        continue
                    if not doc.text.strip():
                        if on_skip is not None:
                            on_skip(p, f"line {lineno}: document {_show(doc.id)} has empty text")
                        continue
                    _validate_in(doc, limits, f"{name} line {lineno}")
                    empty = False
                    yield doc
            if empty and on_skip is not None:
                on_skip(p, "no documents")
            return
        data = p.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read {_show(name)}: {exc.strerror or exc}") from None
    doc = _single(data, p.name, suffix, doc_id or p.name, name)
    if not doc.text.strip():
        if on_skip is not None:
            on_skip(p, "no extractable text" + (" (scanned PDF? OCR it first)" if suffix == ".pdf" else ""))
        return
    _validate_in(doc, limits, name)
    yield doc


def _walk(folder: Path) -> list[Path]:
    """Every non-hidden regular file under ``folder``, sorted by relative path."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        base = Path(dirpath)
        for f in filenames:
            if f.startswith("."):
                continue
            fp = base / f
            if fp.is_file():
                found.append((fp.relative_to(folder).as_posix(), fp))
    found.sort(key=lambda x: x[0])
    return [fp for _, fp in found]


def iter_documents(
    paths: Sequence[str | Path] | str | Path,
    limits: LimitSettings,
    *,
    on_skip: SkipHandler | None = None,
    on_error: ErrorHandler | None = None,
) -> Iterator[Document]:
    """Documents of files and folders, in a stable order.

    Folders are walked recursively in sorted order, skipping hidden files and
    folders (names starting with "."); their unsupported files are skipped and
    reported to ``on_skip(path, reason)``.  A file named directly must be
    supported (``UnsupportedFile`` otherwise).  A file that fails to load
    raises, or, when ``on_error`` is given, is reported to ``on_error(path,
    error)`` and skipped.  A path that does not exist is an ``InvalidInput``.

    Two documents with the same id (``index.md`` in two folders given side by
    side, or a repeated JSONL ``_id``) would silently overwrite each other in
    the store, so the second one is an ``InvalidInput`` (reported to
    ``on_error`` and skipped when a handler is given).
    """
    items: Iterable[str | Path] = [paths] if isinstance(paths, str | Path) else paths
    seen: dict[str, Path] = {}  # document id -> the file it came from
    for item in items:
        root = Path(item)
        if root.is_dir():
            targets = [(fp, fp.relative_to(root).as_posix()) for fp in _walk(root)]
            for fp, _ in targets:
                if _suffix(fp.name) not in SUPPORTED_SUFFIXES and on_skip is not None:
                    on_skip(fp, f"unsupported file type {_suffix(fp.name) or '(none)'!r}")
            targets = [(fp, rel) for fp, rel in targets if _suffix(fp.name) in SUPPORTED_SUFFIXES]
        elif root.is_file():
            targets = [(root, root.name)]
        else:
            raise InvalidInput(f"path not found: {_show(str(root), 200)}; give an existing file or folder")
        for fp, rel in targets:
            try:
                for doc in iter_file(fp, limits, doc_id=rel, on_skip=on_skip):
                    first = seen.get(doc.id)
                    if first is None:
                        seen[doc.id] = fp
                    else:
                        dup = InvalidInput(
                            f"duplicate document id {_show(doc.id)} in {_show(str(fp))} (first read "
                            f"from {_show(str(first))}); ids must be unique: fix the repeated JSONL "
                            "'_id', or ingest the common parent of two folders instead of both"
                        )
                        if on_error is None:
                            raise dup
                        on_error(fp, dup)
                        continue
                    yield doc
            except InvalidInput as exc:
                if on_error is None:
                    raise
                on_error(fp, exc)


# --------------------------------------------------------------------------- validation


def validate_document(doc: Document, limits: LimitSettings) -> None:
    """Check a document before it is stored; raise with a message that says what to fix.

    * ``id``: a non-empty string of at most 512 characters without control
      characters (ids appear in chunk ids, cache dependency records and logs);
    * ``text``: not empty or whitespace-only; title + text at most
      ``limits.max_document_bytes`` UTF-8 bytes (``PayloadTooLarge``);
    * ``metadata``: a JSON-serialisable object of at most
      ``limits.max_metadata_bytes`` bytes when serialised (``PayloadTooLarge``).
    """
    did = doc.id
    if not isinstance(did, str) or not did.strip():
        raise InvalidInput("document id must be a non-empty string")
    if len(did) > MAX_ID_CHARS:
        raise InvalidInput(
            f"document id {_show(did)} is {len(did)} characters; the maximum is "
            f"{MAX_ID_CHARS}: use a shorter id (e.g. a hash of the long one)"
        )
    if _CONTROL.search(did):
        raise InvalidInput(f"document id {_show(did)} contains control characters (newline, tab, ...); remove them")
    if not isinstance(doc.text, str):
        raise InvalidInput(f"document {_show(did)}: text must be a string")
    if not isinstance(doc.title, str):
        raise InvalidInput(f"document {_show(did)}: title must be a string")
    if not doc.text.strip():
        raise InvalidInput(f"document {_show(did)} has empty text; give it some text or leave it out")
    check_unicode(did, "document id")
    check_unicode(doc.title, f"document {_show(did)}: title")
    check_unicode(doc.text, f"document {_show(did)}: text")
    limit = limits.max_document_bytes
    n_chars = len(doc.text) + len(doc.title)
    # Each char is 1-4 UTF-8 bytes: only encode when the char count cannot decide.
    if n_chars * 4 > limit:
        n_bytes = len(doc.text.encode()) + len(doc.title.encode()) if n_chars <= limit else n_chars
        if n_bytes > limit:
            exact = "" if n_chars <= limit else "at least "
            raise PayloadTooLarge(
                f"document {_show(did)} is {exact}{_mb(n_bytes)} of text, over the limit "
                f"of {_mb(limit)} (limits.max_document_bytes); split it into smaller "
                "documents or raise the limit"
            )
    if not isinstance(doc.metadata, dict):
        raise InvalidInput(f"document {_show(did)}: metadata must be a JSON object")
    if doc.metadata:
        try:
            n_meta = len(orjson.dumps(doc.metadata))
        except (TypeError, orjson.JSONEncodeError) as exc:
            raise InvalidInput(
                f"document {_show(did)}: metadata is not JSON-serialisable ({exc}); "
                "use strings, numbers, booleans, lists and objects with string keys"
            ) from None
        if n_meta > limits.max_metadata_bytes:
            raise PayloadTooLarge(
                f"document {_show(did)}: metadata is {n_meta:,} bytes as JSON, over the "
                f"limit of {limits.max_metadata_bytes:,} (limits.max_metadata_bytes); "
                "keep large data out of metadata"
            )
