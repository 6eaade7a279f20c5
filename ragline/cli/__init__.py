"""Command line: ingest | delete | search | ask | serve | migrate | reembed | bench | cache | jobs.

One module per group of commands, all registered on the one Typer ``app`` of :mod:`ragline.cli.common`.
"""

from __future__ import annotations

import sys

from ragline.cli import admin, bench, docs, serve, store  # noqa: F401  (each registers its commands)
from ragline.cli.common import app, err
from ragline.errors import RaglineError

__all__ = ["app", "main"]


def main() -> None:
    try:
        app()
    except RaglineError as exc:  # raised outside _run (e.g. settings)
        err.print(f"[red]error:[/red] {exc.message}", highlight=False, soft_wrap=True)
        sys.exit(2)
