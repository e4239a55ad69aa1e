"""User-facing errors.

Every error a user can cause (a bad file, a wrong option, a checkpoint of another preset)
is a :class:`CtmaskError`. The CLI prints it without a traceback and exits non-zero; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class CtmaskError(Exception):
    """Base class of errors caused by input, not by a bug.

    Args:
        message: what was expected and what was found.
        path: the offending file, if any; it is named first in ``str(err)``.
        hint: how to fix it, if known.
    """

    def __init__(self, message: str, path: str | Path | None = None, hint: str | None = None):
        self.message = message
        self.path = None if path is None else Path(path)
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path is not None else self.message
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class DataError(CtmaskError):
    """An input file (image, mask, split file) is missing, unreadable or malformed."""


class CheckpointError(CtmaskError):
    """A checkpoint is missing, unreadable or does not match the requested model."""


class ConfigError(CtmaskError):
    """An option or preset name is invalid."""


class CtmaskWarning(UserWarning):
    """Something the user should know that does not stop the command (the CLI prints it
    as one ``warning:`` line on stderr)."""
