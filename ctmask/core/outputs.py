"""Output paths: checked against the inputs and each other before a command runs, and locked
while a run writes them.

:func:`check_outputs` is the one check every command makes before any work: no output is an
input, another output, or inside a folder the command fills, whatever the spelling (relative
paths, ``..``, symlinks, hard links); an output folder holds no input. An output written
inside an input folder is allowed when it is not a slice of that folder (a predictions file
next to the scans), and :meth:`OutputPaths.excludes` keeps it (and everything under an output
folder there, e.g. overlays) out of the inputs when the folder is listed again.

:func:`output_lock` makes a second run that writes the same file (``infer --resume`` twice at
once) exit naming the first, instead of both writing and losing records.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from ctmask.core.errors import ConfigError, DataError, OutputPathError

PathsArg = str | Path | Iterable[str | Path | None] | None
"""One path, several (a command's list argument), or None (option not given); '-' (stdout) is skipped."""


@dataclass(frozen=True)
class NamedPath:
    """A path as the user gave it, with the option or argument that gave it (``--out``, ``MODEL``)."""

    name: str
    given: Path
    real: Path

    def __str__(self) -> str:
        return f"{self.name} {self.given}"


def _real(path: Path) -> Path:
    """The path with symlinks, ``.`` and ``..`` resolved as far as it exists (then appended as written)."""
    try:
        return Path(os.path.realpath(path))
    except (OSError, ValueError):
        return Path(os.path.abspath(path))


def named_paths(spec: Mapping[str, PathsArg]) -> list[NamedPath]:
    """``{option: path or paths}`` as :class:`NamedPath` items (None and '-' left out)."""
    out = []
    for name, value in spec.items():
        if value is None:
            continue
        values = [value] if isinstance(value, (str, Path)) else list(value)
        for v in values:
            if v is None or str(v) in ("", "-"):
                continue
            out.append(NamedPath(name, Path(v), _real(Path(v))))
    return out


def same_path(a: NamedPath, b: NamedPath) -> bool:
    """One file or folder under both names: the same resolved path, or (existing) the same inode."""
    if a.real == b.real:
        return True
    try:
        return os.path.samefile(a.given, b.given)
    except (OSError, ValueError):
        return False


def _inside(child: Path, folder: Path) -> bool:
    return child != folder and child.is_relative_to(folder)


def _spelling(a: NamedPath, b: NamedPath) -> str:
    return "" if str(a.given) == str(b.given) else f" (the same {'folder' if a.real.is_dir() else 'file'} " \
                                                   "under another name: a symlink, a link or another spelling)"


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _blocking_file(path: Path) -> Path | None:
    """The first existing ancestor of ``path`` that is not a folder (so ``path`` cannot be made)."""
    for parent in path.parents:
        try:
            if parent.exists():
                return None if parent.is_dir() else parent
        except OSError:
            return None
    return None


def _special(path: Path) -> str | None:
    """What an existing ``path`` (symlinks followed) is when it is neither a regular file nor a
    folder (a device, a named pipe, a socket), else None."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "not a regular file")


def _via_system(path: Path) -> str | None:
    """The ``/dev`` or ``/proc`` path that ``path`` is, or that a symlink on its way leads through
    (``/dev/stdout`` -> ``/proc/self/fd/1``): a stream of this or another process, not a file to
    replace; else None."""
    seen, current = 0, Path(os.path.abspath(path))
    while seen < 40:
        if current.parts[:2] in (("/", "dev"), ("/", "proc")):
            return str(current)
        if not current.is_symlink():
            parent = Path(os.path.realpath(current.parent))
            if parent != current.parent:  # a symlinked folder on the way
                current = parent / current.name
                seen += 1
                continue
            return None
        current = Path(os.path.abspath(current.parent / os.readlink(current)))
        seen += 1
    return None


def _member(o: NamedPath, folder: NamedPath) -> Path | None:
    """The file of the input ``folder``, as listing the folder reads it, that the existing output
    file ``o`` is: ``o`` inside it, or an entry of it that is the same file under another name (a
    hard link, or a symlink to it: a listing follows symlinks to files, not to folders); or None."""
    if not _is_dir(folder.given):
        return None
    try:
        st = os.stat(o.real)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    if _inside(o.real, folder.real):
        return o.real
    hard_links = st.st_nlink > 1
    pending = [str(folder.real)]
    while pending:  # the folder's entries' types come with the listing: only links are looked at
        try:
            with os.scandir(pending.pop()) as it:
                entries = list(it)
        except OSError:
            continue
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif ((entry.is_symlink() or (hard_links and entry.is_file(follow_symlinks=False)))
                      and os.path.samestat(st, os.stat(entry.path))):
                    return Path(entry.path)
    return None


@dataclass
class OutputPaths:
    """The checked outputs of a command (:func:`check_outputs`)."""

    files: list[NamedPath]
    folders: list[NamedPath]

    def excludes(self, path: str | Path) -> bool:
        """True when ``path`` is one of these outputs or lies in an output folder: found while
        listing an input folder, it is this command's own output, never an input."""
        real = _real(Path(path))
        return any(real == f.real for f in self.files) or any(real == d.real or _inside(real, d.real)
                                                              for d in self.folders)


def check_outputs(inputs: Mapping[str, PathsArg], outputs: Mapping[str, PathsArg],
                  folders: Mapping[str, PathsArg] | None = None,
                  is_input_file: Callable[[Path], bool] | None = None) -> OutputPaths:
    """Refuse outputs that would overwrite an input or each other, before any work is done.

    Args:
        inputs: every path the command reads, by option / argument name (files or folders).
        outputs: every file the command writes (sidecars included), by name; '-' is stdout.
        folders: every folder the command fills (``--overlays``, ``--triton-repo``, ``synth OUT``).
        is_input_file: for an existing output file inside an input folder, whether listing that
            folder would take it as an input (a slice); such a file is refused. Default: every file.

    Returns:
        the outputs, whose :meth:`OutputPaths.excludes` tells an input listing what to leave out.

    Raises:
        OutputPathError: an output file that is a folder, a device, a named pipe or a socket
            (outputs are replaced by regular files), or lies under a file; an output that is
            an input (same resolved path or same inode), or an existing input file inside an
            input folder (or reached from it through a symlink); an output folder that is, or
            holds, an input; two outputs that are one file, or an output inside an output folder.
    """
    ins, outs, dirs = named_paths(inputs), named_paths(outputs), named_paths(folders or {})
    for o in outs:
        if _is_dir(o.given):
            raise OutputPathError(f"{o.name} is a folder; give a file name", o.given)
        system = _via_system(o.given)
        if system is not None:
            raise OutputPathError(f"{o.name} is {system}, a stream of the system, not a file ctmask can replace; give "
                                  "a file name ('-' for stdout where the option takes it)", o.given)
        special = _special(o.given)
        if special is not None:
            raise OutputPathError(f"{o.name} is {special}, not a regular file: ctmask writes its outputs as files "
                                  "(replacing what is there); give a file name ('-' for stdout where the option "
                                  "takes it)", o.given)
    for o in [*outs, *dirs]:
        blocking = _blocking_file(o.real)
        if blocking is not None:
            raise OutputPathError(f"{o.name}: {blocking} is a file, not a folder", o.given)
    for d in dirs:
        if d.given.exists() and not _is_dir(d.given):
            raise OutputPathError(f"{d.name} is {_special(d.given) or 'a file'}; give a folder", d.given)
    for o in outs:
        for i in ins:
            if same_path(o, i):
                raise OutputPathError(f"{o.name} would overwrite an input ({i}){_spelling(o, i)}", o.given)
            member = _member(o, i)
            if member is not None and (is_input_file is None or is_input_file(member)):
                raise OutputPathError(f"{o.name} would overwrite an input: {member}, a file of the input folder {i}"
                                      + ("" if member == o.real else " (the same file under another name)"), o.given)
    for d in dirs:
        for i in ins:
            if same_path(d, i) or _inside(i.real, d.real):
                raise OutputPathError(f"{d.name} would write into a folder that holds an input ({i})", d.given)
    for k, a in enumerate(outs):
        for b in outs[k + 1:]:
            if same_path(a, b):
                what = a.name if a.name == b.name else f"{a.name} and {b.name}"
                raise OutputPathError(f"{what} must be different files{_spelling(a, b)}", b.given)
    for o in outs:
        for d in dirs:
            if same_path(o, d) or _inside(o.real, d.real):
                raise OutputPathError(f"{o.name} lies inside {d}, which this command fills", o.given)
    for k, a in enumerate(dirs):
        for b in dirs[k + 1:]:
            if same_path(a, b) or _inside(a.real, b.real) or _inside(b.real, a.real):
                raise OutputPathError(f"{a.name} and {b.name} must be separate folders (one is, or holds, the "
                                      "other)", b.given)
    return OutputPaths(outs, dirs)


# ---------------------------------------------------------------- the lock of an output


def lock_path(path: str | Path) -> Path:
    """The lock file of an output: ``p.jsonl`` -> ``p.jsonl.lock``, beside the file the path
    resolves to (so a symlink to the output, or another spelling of it, shares its lock)."""
    real = _real(Path(path))
    return real.with_name(real.name + ".lock")


def _try_lock(fd: int) -> bool:
    if sys.platform == "win32":  # pragma: no cover - no Windows runner here
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


MAX_LOCK_BYTES = 4096
"""A lock file ctmask writes (its holder, one JSON line) is never longer."""


def _lock_text(fd: int) -> dict | None:
    """The holder a lock file names (an empty file: a lock whose run had not written it yet ->
    ``{}``), or None when the file is not a lock ctmask wrote."""
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, MAX_LOCK_BYTES + 1)
    if not data.strip():
        return {}
    try:
        info = json.loads(data.decode("utf-8", "surrogateescape")) if len(data) <= MAX_LOCK_BYTES else None
    except (ValueError, RecursionError):
        return None
    return info if isinstance(info, dict) and {"pid", "host", "since", "command"} <= set(info) else None


def _holder(fd: int, lock: Path) -> str:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        info = _lock_text(fd)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
        return f"pid {int(info['pid'])} on {info['host']} since {since} ({str(info['command'])[:200]})"
    return f"the process that holds {lock}"


def _not_a_lock(lock: Path, what: str) -> ConfigError:
    return ConfigError(f"the lock file of this output is {what}, not a lock file ctmask made; ctmask will not "
                       "write to it", lock, hint="move it away (nothing else should be named like an output plus "
                                                 "'.lock'), or write the output to another file")


def _open_lock(lock: Path) -> tuple[int, bool]:
    """Open the lock file, creating it when missing: ``(fd, created)``. Never follows a symlink
    nor opens a device or a named pipe.

    Raises:
        ConfigError: the lock path is a symlink, not a regular file, or a file with other names.
    """
    flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        try:
            return os.open(lock, flags | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            pass
        try:
            mode = os.lstat(lock).st_mode
            if stat.S_ISLNK(mode) or not stat.S_ISREG(mode):  # refused before it is opened
                raise _not_a_lock(lock, "a symlink" if stat.S_ISLNK(mode) else _special(lock) or "a folder")
            fd = os.open(lock, flags)
        except FileNotFoundError:
            continue  # removed since (its holder ended): create it
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # made a symlink since the lstat
                raise _not_a_lock(lock, "a symlink") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            raise _not_a_lock(lock, "not a regular file" if not stat.S_ISREG(st.st_mode)
                              else f"a file with {st.st_nlink} names (hard links)")
        return fd, False


def _lock_output_file(path: Path) -> int | None:
    """Lock the existing output file itself (its inode), so that a run writing it under another
    name (a hard link) is refused too: the descriptor to close at the end, or None (no file yet).

    Raises:
        DataError: another run holds it.
    """
    if sys.platform == "win32":  # pragma: no cover - msvcrt locks byte ranges of files opened for writing
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    if not _try_lock(fd):
        os.close(fd)
        raise DataError("another run is writing this file under another name (a hard link to it); wait for it to "
                        "end (or stop it), or write to another file", path)
    return fd


def _remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files a killed run left of ``path`` (:func:`ctmask.core.fileio.atomic_path`
    names them ``.<name>.XXXXXXXX.tmp``): with the lock held, no other run is writing them."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[A-Za-z0-9_]{{8}}\.tmp")
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


@contextlib.contextmanager
def output_lock(path: str | Path, command: str = "ctmask") -> Iterator[Path]:
    """Hold an exclusive lock on the output ``path`` for the block: ``flock`` on its lock file
    (:func:`lock_path`, keyed on the resolved path) and on the output file itself when it exists
    (a hard link is the same file under a name of its own).

    The lock file names its holder (pid, host, start, command) for the run that is refused; it
    is removed when the block ends. A run killed with SIGKILL leaves it behind, unlocked (the
    kernel drops the lock with the process): the next run takes it over, and removes the
    temporary files a killed run left of ``path``. Only a lock file ctmask made (it names a
    holder, or is empty) is ever written or removed: a symlink, a device, a named pipe, a file
    with other names or with other contents at the lock's path is refused.

    Raises:
        DataError: another run holds the lock (exit 2), naming it.
        ConfigError: something that is not a ctmask lock file is at the lock's path (exit 2).
    """
    lock = lock_path(path)
    made = [p for p in (lock.parent, *lock.parent.parents) if not p.exists()]
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd, created = _open_lock(lock)
        if not _try_lock(fd):
            holder = _holder(fd, lock)
            os.close(fd)
            raise DataError(f"another run is writing it: {holder}; wait for it to end (or stop it), or write to "
                            "another file", path)
        try:  # the holder before us may have removed the file between our open and our lock: lock it anew
            same = os.path.samestat(os.fstat(fd), os.lstat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    out_fd = None
    try:
        if not created and _lock_text(fd) is None:  # someone's file, not a lock a killed run left
            raise _not_a_lock(lock, f"a file holding something else ({os.fstat(fd).st_size} bytes)")
        out_fd = _lock_output_file(Path(path))
        _remove_stale_temporaries(Path(path))
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "command": command[:1000]}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode("utf-8", "surrogateescape") + b"\n")
    except BaseException:
        _release(lock, fd, out_fd, created, made)  # a file this run did not make is left as it was
        raise
    try:
        yield lock
    finally:
        _release(lock, fd, out_fd, True, made)


def _release(lock: Path, fd: int, out_fd: int | None, remove: bool, made: list[Path]) -> None:
    if out_fd is not None:
        os.close(out_fd)
    if remove:
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.lstat(lock)):
                lock.unlink()  # while still locked: a waiting run then creates a new file and locks that
    os.close(fd)
    for folder in made:  # folders made for the lock alone (a run that failed before writing) go too
        with contextlib.suppress(OSError):
            folder.rmdir()
