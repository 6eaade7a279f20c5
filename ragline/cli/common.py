"""What every command shares: the Typer app, the consoles, the common options, settings and error exits.

Every command builds ``Settings`` once (``--config`` YAML, ``RAGLINE_*`` env, ``--data-dir``) and drives
the same pipeline the server uses.  Errors a user can fix print one line on stderr and exit with status 2
(1 for internal ones).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
import typer
from rich.console import Console

from ragline.config import Settings
from ragline.errors import ConfigError, RaglineError

T = TypeVar("T")
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="ragline: fast, cache-first retrieval-augmented generation.",
)
err = Console(stderr=True)
out = Console()

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="where the index lives (default ./.ragline)")]
TenantOpt = Annotated[str, typer.Option("--tenant", help="tenant to read or write")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of text")]
UrlOpt = Annotated[str | None, typer.Option("--url", help="a running ragline server, e.g. http://127.0.0.1:8080")]
ApiKeyOpt = Annotated[
    str | None, typer.Option("--api-key", envvar="RAGLINE_API_KEY", help="--url: sent as Authorization: Bearer")
]


def settings_of(config: Path | None, data_dir: Path | None, **extra: Any) -> Settings:
    overrides: dict[str, Any] = dict(extra)
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    try:
        return Settings.load(config, **overrides)
    except RaglineError as exc:
        err.print(f"[red]error:[/red] {exc.message}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except RaglineError as exc:
        err.print(f"[red]error:[/red] {exc.message}", highlight=False, soft_wrap=True)
        # settings that cannot work together are the user's to fix, like bad input: 2; internal failures: 1
        raise typer.Exit(1 if exc.status >= 500 and not isinstance(exc, ConfigError) else 2) from None


async def with_rag(settings: Settings, fn: Any) -> Any:
    from ragline.pipeline import AsyncRAG

    async with AsyncRAG(settings) as rag:
        return await fn(rag)


def usage_error(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def json_text(obj: Any) -> str:
    """``obj`` as the indented JSON every ``--json`` prints (one trailing newline)."""
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n"


def print_json(obj: Any) -> None:
    sys.stdout.write(json_text(obj))


def print_jobs(jobs: list[dict[str, Any]], json: bool) -> None:
    if json:
        print_json(jobs)
        return
    from ragline.jobclient import describe

    for j in jobs:
        out.print(describe(j), highlight=False, soft_wrap=True)
    if not jobs:
        out.print("no jobs")
