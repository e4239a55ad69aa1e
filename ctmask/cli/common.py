"""Shared pieces of the ``ctmask`` commands: error handling, JSON output, common options."""

from __future__ import annotations

import functools
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from ctmask.core.errors import CtmaskError, CtmaskWarning


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


def json_to_stdout(path: Path | None) -> bool:
    """True when ``--json -`` asks for the JSON on stdout."""
    return path is not None and str(path) == "-"


def human_echo(json_path: Path | None) -> Callable[..., None]:
    """``typer.echo`` for a command's human-readable output.

    With ``--json -`` stdout carries the JSON alone, so the human output goes to stderr.
    """
    to_stderr = json_to_stdout(json_path)

    def echo(message: str = "", **kwargs: Any) -> None:
        typer.echo(message, err=to_stderr or kwargs.pop("err", False), **kwargs)

    return echo


def show_ctmask_warnings() -> None:
    """Print :class:`CtmaskWarning` as one ``warning: ...`` line on stderr (no source line);
    other warnings keep Python's format. Each one is shown every time it occurs."""
    warnings.simplefilter("always", CtmaskWarning)
    default = warnings.showwarning
    if getattr(default, "ctmask", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CtmaskWarning):
            typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)
        else:
            default(message, category, filename, lineno, file, line)

    show.ctmask = True
    warnings.showwarning = show


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
