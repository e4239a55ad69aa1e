"""Shared pieces of the ``ctmask`` commands: error handling, JSON output, common options."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from ctmask.core.errors import CtmaskError


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print :class:`CtmaskError` without a traceback and exit 2; bugs keep theirs."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CtmaskError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return wrapper


def emit_json(obj: Any, path: Path | None) -> None:
    """Write ``obj`` as JSON to ``path`` (atomically), or to stdout when ``path`` is '-'."""
    if path is None:
        return
    if str(path) == "-":
        sys.stdout.write(json.dumps(obj, indent=2) + "\n")
        return
    from ctmask.core.fileio import write_json_atomic

    write_json_atomic(path, obj)
    typer.echo(f"wrote {path}", err=True)


PresetOpt = typer.Option("small", "--preset", "-p", help="Model preset: 'small' or 'paper'.")
JsonOpt = typer.Option(None, "--json", help="Write results as JSON to this file ('-' for stdout).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars.")
