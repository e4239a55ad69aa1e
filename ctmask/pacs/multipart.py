"""A WADO-RS answer (``multipart/related; type="application/dicom"``) split into its parts as it
streams, each part written to its own file without being decoded, with a cap on its size.

dicomweb-client reads each part whole into memory and parses it with pydicom before handing it
over, which would bypass the readers' limits (a Deflated instance is inflated whole by pydicom, a
huge part is held whole). Here the bytes go to disk as they come (memory: one network chunk and
the boundary), and the file readers of :mod:`ctmask.scans` then read them as any file on disk,
with their size limits and refusals.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from ctmask.core.errors import PacsError

MAX_INSTANCE_BYTES = 4 << 30
"""Most bytes one instance of a WADO-RS answer may hold (4 GiB: an enhanced CT of 8192 frames of
512 x 512 x 16 bits); a larger part is refused (not written past this) and named."""

MAX_PART_HEADER_BYTES = 64 << 10

MIN_RATE = 16 << 10
"""Bytes per second an answer must average once it has run :data:`GRACE_S` seconds: a server
trickling a byte per minute stays under the per-read timeout and would hold the run for ever."""

GRACE_S = 60.0

MAX_PARTS = 100_000
"""Most instances one WADO-RS answer (a series) may hold; an endless stream of small parts
would otherwise fill the disk."""


def boundary_of(content_type: str) -> bytes:
    """The boundary of a ``multipart/related`` Content-Type.

    Raises:
        PacsError: another media type, or no boundary.
    """
    media, *params = [p.strip() for p in content_type.split(";")]
    if media.lower() != "multipart/related":
        raise PacsError(f"WADO-RS answered {media or 'no media type'}, not multipart/related")
    for p in params:
        name, _, value = p.partition("=")
        if name.strip().lower() == "boundary" and value.strip().strip('"'):
            return value.strip().strip('"').encode()
    raise PacsError("WADO-RS answered multipart/related without a boundary")


def _paced(chunks: Iterable[bytes], clock: Callable[[], float]) -> Iterator[bytes]:
    """``chunks``, abandoned (:class:`PacsError`) once they arrive at under ``MIN_RATE`` bytes/s after
    ``GRACE_S`` seconds: a server trickling bytes just under the read timeout would hold a run for ever."""
    start, total = clock(), 0
    for chunk in chunks:
        total += len(chunk)
        spent = clock() - start
        if spent > GRACE_S and total < MIN_RATE * spent:
            raise PacsError(f"WADO-RS answer: {total} bytes in {spent:.0f} s, under {MIN_RATE} bytes/s: abandoned")
        yield chunk


def split_parts(chunks: Iterable[bytes], boundary: bytes, open_part: Callable[[int], tuple[Path, BinaryIO]],
                limit: int = MAX_INSTANCE_BYTES, max_parts: int = MAX_PARTS,
                clock: Callable[[], float] = time.monotonic) -> tuple[list[Path], list[tuple[int, str]]]:
    """Write each part of the multipart body ``chunks`` to the file ``open_part(n)`` opens (n from
    1); the paths written, and the parts refused ((n, why): over ``limit`` bytes; their partial
    file is removed)."""
    delim = b"\r\n--" + boundary
    buf = bytearray(b"\r\n")  # the body starts with "--boundary": match it as a delimiter
    state, n, size, preamble = "preamble", 0, 0, 0
    out: BinaryIO | None = None
    path: Path | None = None
    written: list[Path] = []
    refused: list[tuple[int, str]] = []

    def close(keep: bool) -> None:
        nonlocal out
        if out is not None and path is not None:
            out.close()
            if keep:
                written.append(path)
            else:
                path.unlink(missing_ok=True)
        out = None

    def write(data: bytes | bytearray) -> None:
        nonlocal size, out
        size += len(data)
        if out is None and size > 2 * limit:  # refused, and still coming: an endless part would be read for ever
            raise PacsError(f"WADO-RS part {n}: over {2 * limit} bytes and still coming: the answer abandoned")
        if out is not None and size > limit:
            refused.append((n, f"over {limit} bytes: refused"))
            close(False)
        elif out is not None:
            out.write(data)

    try:
        for chunk in _paced(chunks, clock):
            buf += chunk
            while True:
                if state in ("preamble", "body"):
                    i = buf.find(delim)
                    if i < 0:
                        keep = len(delim) - 1
                        if state == "body" and len(buf) > keep:
                            write(buf[:-keep])
                        elif state == "preamble":
                            preamble += max(len(buf) - keep, 0)
                            if preamble > MAX_PART_HEADER_BYTES:  # an endless answer with no boundary
                                raise PacsError(f"WADO-RS answer: no boundary in its first {MAX_PART_HEADER_BYTES} "
                                                "bytes (not the boundary its Content-Type names)")
                        del buf[:-keep]
                        break
                    if state == "body":
                        write(buf[:i])
                        close(True)
                    del buf[:i + len(delim)]
                    state = "after"
                if state == "after":
                    if len(buf) < 2:
                        break
                    if buf[:2] == b"--":
                        return written, refused
                    state = "headers"
                if state == "headers":
                    i = buf.find(b"\r\n\r\n")
                    if i < 0:
                        if len(buf) > MAX_PART_HEADER_BYTES:
                            raise PacsError(f"WADO-RS part {n + 1}: headers over {MAX_PART_HEADER_BYTES} bytes")
                        break
                    del buf[:i + 4]
                    if n >= max_parts:
                        raise PacsError(f"WADO-RS answer: over {max_parts} instances: abandoned")
                    n, size = n + 1, 0
                    path, out = open_part(n)
                    state = "body"
        if state != "preamble":
            raise PacsError("WADO-RS answer cut short (no closing boundary)")
        return written, refused
    finally:
        close(False)

