"""Atomic file writing: a crash or an error never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ctmask.core.errors import DataError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    The temporary file lives in the same directory so the final ``os.replace`` is atomic
    on POSIX. On success the temporary file is ``fsync``-ed before the rename and the
    directory after it, so a crash (or power loss) leaves either the old file or the
    complete new one, never an empty one. On any exception the temporary file is removed
    and ``path`` is untouched. A ``path`` that is a symlink is written through: the file it
    leads to is replaced, the link stays (the output checks judge that resolved file).
    """
    path = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp creates 0600; give the result the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        fsync_file(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_file(path: str | Path) -> None:
    """Flush ``path``'s data to the disk (``os.fsync``), so a rename onto it is durable."""
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows fsyncs writable handles only
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a directory entry change (a rename) to the disk; a no-op where directories
    cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the rename itself happened
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def output_error(exc: OSError, path: str | Path) -> DataError:
    """The error for an output that could not be written (disk full, permissions), naming it;
    the atomic writers leave nothing of it behind."""
    what = exc.strerror or " ".join(str(exc).split())[:200] or exc.__class__.__name__
    return DataError(f"cannot write it ({what}); no partial file was left", path)


def close_atomic(ctx: Any, path: str | Path, finish: Any, exc_type: Any, exc: Any, tb: Any) -> None:
    """End a writer built on :func:`atomic_path`: ``finish()`` completes the temporary file
    (close it, or write it whole), then ``ctx`` renames it onto ``path``, or removes it when
    the block failed or ``finish`` did. An OS error (disk full, permissions) becomes
    :func:`output_error` naming ``path``."""
    try:
        finish()
    except BaseException as err:
        ctx.__exit__(type(err), err, err.__traceback__)  # removes the temporary file
        if isinstance(err, OSError):
            raise output_error(err, path) from None
        raise
    try:
        ctx.__exit__(exc_type, exc, tb)
    except OSError as err:
        raise output_error(err, path) from None
