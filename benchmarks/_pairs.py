"""Labelled sentence pairs for the semantic-cache decision: loading, disjoint splits, cached vectors.

Shared by ``semantic_fit.py`` (fits the accept model) and ``semantic_accuracy.py`` (measures it), so
both see exactly the same splits:

* **QQP** (``qqp/qqp_pairs_sample.tsv``, 10,000 Quora pairs, positive = ``is_duplicate``).  The file has
  no question ids, so the ids are the questions' canonical texts: pairs that share a question are
  joined into one connected component (union-find), and whole components go to ``fit`` (45%), ``val``
  (20%) or ``test`` (35%) by a hash of the component's smallest text.  No question text of one split
  appears in another (checked by :func:`check_disjoint`).
* **STS-B** (graded 0–5, positive = score ≥ 4): ``train`` → fit, ``dev`` → val, ``test`` → test.

``fit`` is what the model is fitted on, ``val`` what its thresholds are chosen on, ``test`` what is
reported; nothing else of ``/work/shared/data`` is used.

Vectors: every text is embedded as the pipeline embeds a query, i.e. its
:func:`~ragline.canonical.query_form` (trailing "?" and "." removed), with all-MiniLM-L6-v2
(``LocalEmbedder``), once, and cached in ``benchmarks/results/.cache/`` keyed by the exact text set.
"""

from __future__ import annotations

import csv
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from _common import DATA

from ragline.canonical import canonical, query_form

STS_POSITIVE = 4.0
QQP_SHARES = (("fit", 45), ("val", 20), ("test", 35))
CACHE = Path(__file__).resolve().parent / "results" / ".cache"


@dataclass
class Split:
    """Labelled pairs (texts in query form); ``y`` is 1 when serving one's answer for the other is right."""

    name: str
    a: list[str]
    b: list[str]
    y: npt.NDArray[np.int8]


def _qqp_rows(path: Path) -> list[tuple[str, str, int]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        if header[:4] != ["source_index", "question1", "question2", "is_duplicate"]:
            raise SystemExit(f"{path}: unexpected header {header}")
        return [(r[1], r[2], int(r[3])) for r in reader if len(r) >= 4]


def _sts_rows(path: Path) -> list[tuple[str, str, int]]:
    rows = []
    with path.open(encoding="utf-8", newline="") as f:
        for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(r) >= 7:
                rows.append((r[5], r[6], int(float(r[4]) >= STS_POSITIVE)))
    return rows


def _bucket(text: str) -> str:
    h = int(hashlib.blake2b(text.encode(), digest_size=8).hexdigest(), 16) % 100
    acc = 0
    for name, share in QQP_SHARES:
        acc += share
        if h < acc:
            return name
    return QQP_SHARES[-1][0]


def split_qqp(rows: list[tuple[str, str, int]]) -> dict[str, list[tuple[str, str, int]]]:
    """QQP pairs into fit/val/test by connected component of shared (canonical) questions."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b, _ in rows:
        ra, rb = find(canonical(a)), find(canonical(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[str, str] = {}
    for x in list(parent):
        r = find(x)
        members[r] = min(members.get(r, x), x)
    out: dict[str, list[tuple[str, str, int]]] = {name: [] for name, _ in QQP_SHARES}
    for a, b, y in rows:
        out[_bucket(members[find(canonical(a))])].append((a, b, y))
    return out


def check_disjoint(splits: dict[str, Split]) -> None:
    """No question of one QQP split appears (in canonical form) in another."""
    seen: dict[str, set[str]] = {}
    for name in ("qqp_fit", "qqp_val", "qqp_test"):
        s = splits[name]
        seen[name] = {canonical(t) for t in (*s.a, *s.b)}
    for x in seen:
        for y in seen:
            if x < y and seen[x] & seen[y]:
                raise SystemExit(f"QQP splits {x} and {y} share {len(seen[x] & seen[y])} questions")


def _split(name: str, rows: list[tuple[str, str, int]]) -> Split:
    return Split(
        name,
        [query_form(r[0]) for r in rows],
        [query_form(r[1]) for r in rows],
        np.array([r[2] for r in rows], np.int8),
    )


def load_splits(data: Path) -> dict[str, Split]:
    """``qqp_{fit,val,test}`` and ``stsb_{fit,val,test}`` (STS-B train/dev/test)."""
    qqp = split_qqp(_qqp_rows(data / "qqp" / "qqp_pairs_sample.tsv"))
    splits = {f"qqp_{n}": _split(f"qqp_{n}", rows) for n, rows in qqp.items()}
    for n, f in (("fit", "sts-train.csv"), ("val", "sts-dev.csv"), ("test", "sts-test.csv")):
        splits[f"stsb_{n}"] = _split(f"stsb_{n}", _sts_rows(data / "stsb" / f))
    check_disjoint(splits)
    return splits


def embed_all(
    splits: dict[str, Split], batch_size: int = 128
) -> tuple[dict[str, int], npt.NDArray[np.float32], dict[str, Any]]:
    """Every distinct text of ``splits`` embedded once (MiniLM, L2-normalised), cached on disk."""
    texts = sorted({t for s in splits.values() for t in (*s.a, *s.b)})
    digest = hashlib.blake2b("\n".join(texts).encode(), digest_size=16).hexdigest()
    index = {t: i for i, t in enumerate(texts)}
    path = CACHE / f"pairs-{digest}.npz"
    info: dict[str, Any] = {"texts": len(texts), "cache": str(path.relative_to(CACHE.parents[1]))}
    if path.is_file():
        z = np.load(path, allow_pickle=False)
        info.update(model=str(z["model"]), seconds=0.0, cached=True)
        return index, z["vectors"], info
    from ragline.config import EmbedderSettings
    from ragline.embed.local import LocalEmbedder

    embedder = LocalEmbedder(EmbedderSettings(batch_size=batch_size))
    t0 = time.perf_counter()
    vectors = np.asarray(embedder.embed(texts), dtype=np.float32)
    info.update(model=embedder.id, seconds=round(time.perf_counter() - t0, 1), cached=False)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, model=embedder.id, vectors=vectors)
    return index, vectors, info


if __name__ == "__main__":  # embed ahead of time: python benchmarks/_pairs.py
    import sys

    sp = load_splits(DATA.resolve())
    for n, s in sp.items():
        print(n, len(s.y), int(s.y.sum()), flush=True)
    print(embed_all(sp)[2], file=sys.stderr)
