"""The decoders' warnings and log records, kept with the slice instead of printed.

pydicom, nibabel and Pillow warn (``warnings``) and log (their loggers) about what they read;
:func:`captured` keeps those of the thread decoding in a list of notes (``DecodedSlice.info
["warnings"]``), and raises Pillow's decompression-bomb warning as an error. :func:`error_text`
names a decoder's exception in a failure's reason.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image

_DECODER_LOGGERS = ("pydicom", "nibabel", "nibabel.global", "PIL")
_DECODER_PACKAGES = tuple(f"{os.sep}{p}{os.sep}" for p in ("pydicom", "PIL", "nibabel", "numpy"))
_SCANS = os.path.dirname(__file__) + os.sep  # the readers' own warnings (numpy's, raised in their code)
_MAX_NOTES = 20

_LOCAL = threading.local()  # .notes: the list the current thread's decoder warnings go to
_CAPTURE_LOCK = threading.Lock()
_CAPTURE: dict[str, Any] = {"depth": 0}


def _note(notes: list[str], text: str) -> None:
    text = " ".join(str(text).split())
    if text and text not in notes and len(notes) < _MAX_NOTES:
        notes.append(text)


class _Dispatch(logging.Handler):
    """A decoder logger's record goes to the notes of the thread decoding, else to the logger's own handlers."""

    def __init__(self, original: list[logging.Handler]):
        super().__init__(logging.NOTSET)
        self.original = original

    def emit(self, record: logging.LogRecord) -> None:
        notes = getattr(_LOCAL, "notes", None)
        try:
            if notes is None:
                for handler in self.original:
                    if record.levelno >= handler.level:
                        handler.handle(record)
            elif record.levelno >= logging.WARNING:
                _note(notes, record.getMessage())
        except Exception:  # a malformed log record must not break decoding
            pass


def _show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
          line: str | None = None) -> None:
    notes = getattr(_LOCAL, "notes", None)
    name = str(filename)
    if notes is not None and (name.startswith(_SCANS) or any(p in name for p in _DECODER_PACKAGES)):
        _note(notes, str(message))
    else:
        _CAPTURE["showwarning"](message, category, filename, lineno, file, line)


def _install_capture() -> None:
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("always")  # every file's warnings, not only the first one's
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    _CAPTURE.update(ctx=ctx, showwarning=warnings.showwarning, loggers=[])
    warnings.showwarning = _show
    for name in _DECODER_LOGGERS:  # their own handlers too: nibabel's logger prints to stderr
        logger = logging.getLogger(name)
        _CAPTURE["loggers"].append((logger, logger.handlers[:], logger.propagate))
        logger.handlers = [_Dispatch(logger.handlers[:])]
        logger.propagate = False


def _remove_capture() -> None:
    for logger, handlers, propagate in _CAPTURE.pop("loggers"):
        logger.handlers = handlers
        logger.propagate = propagate
    _CAPTURE.pop("showwarning")
    _CAPTURE.pop("ctx").__exit__(None, None, None)


@contextmanager
def captured(notes: list[str]) -> Iterator[None]:
    """Keep the decoders' (pydicom, nibabel, Pillow) warnings and log records in ``notes`` instead
    of printing them; Pillow's decompression-bomb warning is raised as an error.

    The capture is shared by the threads decoding at the same time (the first one installs it,
    the last one removes it; each thread's records go to its own ``notes``); other warnings and
    records, and other threads', go where they went before. Python's warning filters are
    process-wide: while a capture is on, every warning is shown each time it occurs.
    """
    outer = getattr(_LOCAL, "notes", None)
    with _CAPTURE_LOCK:
        if _CAPTURE["depth"] == 0:
            _install_capture()
        _CAPTURE["depth"] += 1
    _LOCAL.notes = notes
    try:
        yield
    finally:
        _LOCAL.notes = outer
        with _CAPTURE_LOCK:
            _CAPTURE["depth"] -= 1
            if _CAPTURE["depth"] == 0:
                _remove_capture()


def error_text(what: str, exc: BaseException) -> str:
    """``what`` and the exception a decoder raised (its class and text, cut at 300 characters)."""
    if isinstance(exc, MemoryError):
        return f"{what} (not enough memory: the file declares more data than can be held)"
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{what} ({exc.__class__.__name__}: {text})" if text else f"{what} ({exc.__class__.__name__})"


def file_key(path: Path) -> tuple:
    """What tells one file from another and from its earlier versions (a thread's reader keeps the file it
    read last under it): resolved path, modification time, size."""
    st = path.stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)
