"""Reading compressed and nested inputs within :mod:`ctmask.core.limits`, before a decoder does.

* :func:`check_dicom_limits` walks a DICOM file's elements on the raw bytes (inflating a
  Deflated Explicit VR file chunk by chunk, counted and capped at
  :data:`~ctmask.core.limits.MAX_INFLATED_BYTES`) and counts its sequence items (capped at
  :data:`~ctmask.core.limits.MAX_SEQUENCE_ITEMS`) without building them, so pydicom, which
  inflates the whole file and builds every item, only sees files within the limits.
* :class:`GzipCursor` reads byte ranges of a gzip stream: forward reads go on from where the
  last one stopped, backward ones restart from the nearest checkpoint (a copy of the decoder
  state taken every ``checkpoint_bytes`` of output) and keep what they inflated from there, so
  reading a volume's slices forwards inflates it once, backwards about twice; memory is the
  range read, one checkpoint interval and the checkpoints.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import BinaryIO

from ctmask.core.errors import DataError
from ctmask.core.limits import MAX_INFLATED_BYTES, MAX_SEQUENCE_ITEMS, MiB, mib

DEFLATED = "1.2.840.10008.1.2.1.99"
_IMPLICIT_LE, _EXPLICIT_BE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_MAX_DEPTH = 64
_CHUNK = 1 << 16


class _Stop(Exception):
    """The bytes stop making sense as DICOM: the walk ends, pydicom tells what is wrong."""


class _Source:
    """A data set's bytes in order: the file itself, or its inflated stream (counted, capped)."""

    def __init__(self, fh: BinaryIO, deflated: bool, path: Path):
        self.fh, self.path = fh, path
        self.z = zlib.decompressobj(-zlib.MAX_WBITS) if deflated else None
        self.pos = 0  # bytes of the data set consumed
        self.inflated = 0
        self.buf = b""

    def _fill(self) -> bool:
        while not self.buf:
            if self.z.eof:
                return False
            src = self.z.unconsumed_tail or self.fh.read(_CHUNK)
            if not src:
                return False
            try:
                self.buf = self.z.decompress(src, MiB)
            except zlib.error as exc:
                raise _Stop from exc
            self.inflated += len(self.buf)
            if self.inflated > MAX_INFLATED_BYTES:
                raise DataError(f"is a Deflated DICOM that inflates to more than {mib(MAX_INFLATED_BYTES)}, the "
                                "limit (a decompression bomb?); refused before inflating it", self.path)
        return True

    def read(self, n: int) -> bytes:
        if self.z is None:
            data = self.fh.read(n)
            self.pos += len(data)
            return data
        parts, want = [], n
        while want and self._fill():
            part, self.buf = self.buf[:want], self.buf[want:]
            parts.append(part)
            want -= len(part)
        self.pos += n - want
        return b"".join(parts)

    def skip(self, n: int) -> None:
        if self.z is None:
            self.fh.seek(n, 1)
            self.pos += n
            return
        while n > 0:
            got = len(self.read(min(n, MiB)))
            if not got:
                raise _Stop
            n -= got


class _Walk:
    def __init__(self, src: _Source, explicit: bool, little: bool):
        self.src, self.explicit = src, explicit
        self.e = "<" if little else ">"
        self.items = 0

    def dataset(self, end: int | None, depth: int) -> None:
        """Elements up to ``end`` (None: up to an item delimiter or the end of the data)."""
        src, e = self.src, self.e
        while end is None or src.pos < end:
            head = src.read(8)
            if len(head) < 8:
                if end is not None and head:
                    raise _Stop
                return
            group, element = struct.unpack(e + "HH", head[:4])
            tag = group << 16 | element
            if tag in (_ITEM_END, _SEQ_END):
                return
            vr = b""
            if self.explicit and group != 0xFFFE:
                vr = head[4:6]
                if not (vr.isalpha() and vr.isupper()):
                    raise _Stop
                if vr in _LONG_VRS:
                    length = struct.unpack(e + "L", src.read(4) or b"\0\0\0\0")[0]
                else:
                    length = struct.unpack(e + "H", head[6:8])[0]
            else:
                length = struct.unpack(e + "L", head[4:8])[0]
                vr = b"SQ" if length == _UNDEFINED or _is_sequence(tag) else b""
            if vr == b"SQ" or (vr == b"UN" and length == _UNDEFINED):
                self.sequence(length, depth + 1, fragments=False)
            elif length == _UNDEFINED:  # encapsulated pixel data: its fragments are bytes, not items
                self.sequence(length, depth + 1, fragments=True)
            else:
                src.skip(length)

    def sequence(self, length: int, depth: int, fragments: bool) -> None:
        if depth > _MAX_DEPTH:
            raise _Stop
        src, e = self.src, self.e
        end = None if length == _UNDEFINED else src.pos + length
        while end is None or src.pos < end:
            head = src.read(8)
            if len(head) < 8:
                raise _Stop
            group, element, item_length = struct.unpack(e + "HHL", head)
            tag = group << 16 | element
            if tag == _SEQ_END:
                return
            if tag != _ITEM:
                raise _Stop
            if fragments:
                if item_length == _UNDEFINED:
                    raise _Stop
                src.skip(item_length)
                continue
            self.items += 1
            if self.items > MAX_SEQUENCE_ITEMS:
                raise DataError(f"holds more than {MAX_SEQUENCE_ITEMS:,} sequence items, the limit (an enhanced CT "
                                "has about 9 per frame); refused before parsing them", src.path)
            if item_length == _UNDEFINED:
                self.dataset(None, depth)
            else:
                item_end = src.pos + item_length
                self.dataset(item_end, depth)
                if src.pos < item_end:
                    src.skip(item_end - src.pos)


def _is_sequence(tag: int) -> bool:
    from pydicom.datadict import dictionary_VR

    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False


def _file_meta(fh: BinaryIO) -> str | None:
    """The transfer syntax of the file meta group at the file's position (always explicit VR little
    endian), leaving the file at the data set; None without a meta group."""
    ts = None
    while True:
        start = fh.tell()
        head = fh.read(8)
        if len(head) < 8 or struct.unpack("<H", head[:2])[0] != 0x0002:
            fh.seek(start)
            return ts
        element, vr = struct.unpack("<H", head[2:4])[0], head[4:6]
        if vr in _LONG_VRS:
            length = struct.unpack("<L", fh.read(4) or b"\0\0\0\0")[0]
        else:
            length = struct.unpack("<H", head[6:8])[0]
        if length == _UNDEFINED:
            fh.seek(start)
            return ts
        if element == 0x0010 and length <= 64:
            ts = fh.read(length).decode("ascii", "replace").strip("\0 ")
        else:
            fh.seek(length, 1)


def check_dicom_limits(path: str | Path) -> None:
    """Refuse a DICOM file that inflates past :data:`~ctmask.core.limits.MAX_INFLATED_BYTES` or holds
    more than :data:`~ctmask.core.limits.MAX_SEQUENCE_ITEMS` sequence items.

    Reads the file once, streaming (memory: a few MiB whatever the file declares); bytes that
    are not DICOM end the walk quietly (the decoder then says what is wrong).

    Raises:
        DataError: naming the file and the limit.
        OSError: the file cannot be read.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(132)
        fh.seek(132 if head[128:132] == b"DICM" else 0)
        ts = _file_meta(fh)
        start = fh.tell()
        if ts is None:  # no meta: the encoding is guessed from the first element, as pydicom does
            first = fh.read(6)
            fh.seek(start)
            explicit, little = first[4:6].isalpha() and first[4:6].isupper(), True
        else:
            explicit, little = ts != _IMPLICIT_LE, ts != _EXPLICIT_BE
        walk = _Walk(_Source(fh, ts == DEFLATED, path), explicit, little)
        try:
            walk.dataset(None, 0)
        except _Stop:
            pass


# ---------------------------------------------------------------- gzip


CHECKPOINT_BYTES = 4 * MiB
"""Least output bytes between two saved decoder states of a :class:`GzipCursor`."""


class GzipCursor:
    """Byte ranges of a gzip file's decompressed stream, read in any order, inflating it about once.

    Args:
        path: the gzip file (several members are read as one stream, as gzip does).
        checkpoint_bytes: output bytes between checkpoints (at least :data:`CHECKPOINT_BYTES`).

    Memory: the range read, the bytes inflated from the last checkpoint restored (less than
    ``checkpoint_bytes`` plus the range), and one decoder state (~45 KB) per checkpoint.
    """

    def __init__(self, path: str | Path, checkpoint_bytes: int = CHECKPOINT_BYTES):
        self.path = Path(path)
        self.every = max(CHECKPOINT_BYTES, int(checkpoint_bytes))
        self.kept: tuple[int, bytearray] | None = None  # (offset, bytes) inflated after the last restore
        self.fh = open(self.path, "rb")
        self.marks: list[tuple[int, int, object]] = [(0, 0, zlib.decompressobj(zlib.MAX_WBITS | 16))]
        self.inflated = 0  # bytes inflated in all (the cost of the reads so far)
        self._restore(self.marks[0])

    def close(self) -> None:
        self.fh.close()

    def __del__(self) -> None:  # a thread's kept cursor goes with the thread
        fh = getattr(self, "fh", None)
        if fh is not None:
            fh.close()

    def _restore(self, mark: tuple[int, int, object]) -> None:
        self.pos, offset, z = mark
        self.z = z.copy()
        self.fh.seek(offset)
        self.tail = b""  # compressed bytes read but not yet fed

    def _next(self, limit: int) -> bytes:
        """Up to ``limit`` inflated bytes at ``self.pos`` (b"" at the end of the stream)."""
        while True:
            if self.z.eof:
                rest = self.z.unused_data + self.tail
                self.tail = b""
                if not rest:
                    rest = self.fh.read(_CHUNK)
                if not rest.strip(b"\0"):  # the end (trailing zeros are padding, as gzip takes them)
                    return b""
                self.z = zlib.decompressobj(zlib.MAX_WBITS | 16)  # the next member
                self.tail = rest
            src = self.tail or self.fh.read(_CHUNK)
            if not src:
                raise EOFError("the gzip stream ends before the data it declares (truncated file?)")
            out = self.z.decompress(src, limit)
            self.tail = self.z.unconsumed_tail
            if out:
                before = self.pos
                self.pos += len(out)
                self.inflated += len(out)
                if (self.pos // self.every > before // self.every and self.pos > self.marks[-1][0]
                        and not self.z.eof):
                    self.marks.append((self.pos, self.fh.tell() - len(self.tail), self.z.copy()))
                return out

    def read_at(self, offset: int, n: int) -> bytearray | memoryview:
        """``n`` bytes of the decompressed stream from ``offset``.

        Raises:
            EOFError: the stream ends first.
        """
        if self.kept is not None and self.kept[0] <= offset and offset + n <= self.kept[0] + len(self.kept[1]):
            start = offset - self.kept[0]
            return memoryview(self.kept[1])[start : start + n]
        if offset < self.pos:  # backwards: from the checkpoint before, keeping what is inflated up to the end
            self.kept = None
            mark = max((m for m in self.marks if m[0] <= offset), key=lambda m: m[0])
            self._restore(mark)
            block = self._read(offset + n - mark[0])
            self.kept = (mark[0], block)
            return memoryview(block)[offset - mark[0] :]
        self.kept = None
        while self.pos < offset:
            if not self._next(min(offset - self.pos, MiB)):
                raise EOFError("the gzip stream ends before the data it declares (truncated file?)")
        return self._read(n)

    def _read(self, n: int) -> bytearray:
        out, got = bytearray(n), 0
        while got < n:
            piece = self._next(n - got)
            if not piece:
                raise EOFError("the gzip stream ends before the data it declares (truncated file?)")
            out[got : got + len(piece)] = piece
            got += len(piece)
        return out
