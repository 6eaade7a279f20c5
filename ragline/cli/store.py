"""The store commands: ``migrate`` (embedded to PostgreSQL, no re-embedding) and ``reembed``."""

from __future__ import annotations

import sqlite3
from typing import Annotated

import typer

from ragline.cli.common import (
    ConfigOpt,
    DataDirOpt,
    JsonOpt,
    app,
    err,
    out,
    print_json,
    settings_of,
    usage_error,
)
from ragline.errors import RaglineError


@app.command()
def migrate(
    to: Annotated[str, typer.Option("--to", help="the PostgreSQL DSN to copy into (or set RAGLINE_POSTGRES_DSN)")] = "",
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    batch: Annotated[int, typer.Option(help="documents per transaction")] = 64,
) -> None:
    """Copy an embedded data dir into PostgreSQL (schema created or migrated first); no re-embedding."""
    from ragline.store.embedded import EmbeddedStore
    from ragline.store.migrate import copy_store
    from ragline.store.postgres import PostgresStore

    settings = settings_of(config, data_dir)
    dsn = to or (settings.postgres_dsn.get_secret_value() if settings.postgres_dsn is not None else "")
    if not dsn:
        raise usage_error("give the target with --to postgresql://... or RAGLINE_POSTGRES_DSN")
    if not (settings.data_dir / "store.sqlite3").exists():
        raise usage_error(f"no embedded store in {settings.data_dir}")
    meta = (
        sqlite3.connect(settings.data_dir / "store.sqlite3")
        .execute("SELECT value FROM meta WHERE key='dim'")
        .fetchone()
    )
    dim = int(meta[0]) if meta else 384

    def copy() -> dict[str, int]:
        src = EmbeddedStore(settings.data_dir, dim)
        dst = PostgresStore(dsn, dim)
        try:
            return copy_store(src, dst, batch=batch, progress=lambda t, n: err.print(f"  {t}: {n} documents"))
        finally:
            src.close()
            dst.close()

    try:
        copied = copy()
    except RaglineError as exc:
        err.print(f"[red]error:[/red] {exc.message}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    out.print(", ".join(f"{t}: {n} documents" for t, n in copied.items()) or "nothing to copy")


@app.command()
def reembed(
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    batch: Annotated[int, typer.Option(help="documents per transaction")] = 64,
    json: JsonOpt = False,
) -> None:
    """Re-embed the stored corpus with the configured embedder, in place (after switching embedders).

    Reads every document's chunks back from the store, embeds them again and writes the new vectors; no
    source file is needed.  Run it while no process with the old embedder writes to the corpus.
    """
    import time

    from ragline.assembly import build_embedder, open_store
    from ragline.ingest.reembed import reembed_store

    settings = settings_of(config, data_dir)
    t0 = time.perf_counter()
    try:
        embedder = build_embedder(settings.embedder)
        store = open_store(settings, embedder.dim)
        try:
            report = reembed_store(
                store,
                embedder,
                batch_docs=batch,
                progress=lambda t, d, c: err.print(f"  {t}: {d} documents, {c} chunks"),
            )
        finally:
            store.close()
    except RaglineError as exc:
        err.print(f"[red]error:[/red] {exc.message}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    seconds = time.perf_counter() - t0
    chunks = sum(report.chunks.values())
    if json:
        body = {
            "embedder": report.embedder,
            "previous": report.previous,
            "documents": report.documents,
            "chunks": report.chunks,
            "skipped": report.skipped,
            "seconds": round(seconds, 3),
        }
        print_json(body)
        return
    out.print(
        f"re-embedded {sum(report.documents.values())} documents ({chunks} chunks) with {report.embedder} "
        f"in {seconds:.1f} s (was {report.previous or 'unrecorded'}"
        + (f"; {report.skipped} changed meanwhile and kept their writer's vectors)" if report.skipped else ")"),
        highlight=False,
    )
