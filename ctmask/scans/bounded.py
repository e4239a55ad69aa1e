"""Reading compressed and nested inputs within :mod:`ctmask.core.limits`, before a decoder does (the
bomb checks of the readers of scans).

* :func:`check_dicom_limits` walks a DICOM file's elements on the raw bytes (inflating a
  Deflated Explicit VR file chunk by chunk, counted and capped at
  :data:`~ctmask.core.limits.MAX_INFLATED_BYTES`) and counts its sequence items (capped at
  :data:`~ctmask.core.limits.MAX_SEQUENCE_ITEMS`) without building them, so pydicom, which
  inflates the whole file and builds every item, only sees files within the limits.
* :func:`check_compressed_frame` bounds what one compressed frame of pixel data decodes to, from
  its own headers (an RLE segment's runs, a JPEG's SOF, a JPEG 2000's SIZ), before a decoder
  allocates it.
* :class:`GzipCursor` reads byte ranges of a gzip stream: forward reads go on from where the
  last one stopped, backward ones restart from the nearest checkpoint (a copy of the decoder
  state taken every ``checkpoint_bytes`` of output) and keep what they inflated from there, so
  reading a volume's slices forwards inflates it once, backwards about twice; memory is the
  range read, one checkpoint interval and the checkpoints.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

from ctmask.core.errors import DataError
from ctmask.core.limits import MAX_INFLATED_BYTES, MAX_SEQUENCE_ITEMS, MAX_SLICE_BYTES, MiB, mib

DEFLATED = "1.2.840.10008.1.2.1.99"
_IMPLICIT_LE, _EXPLICIT_BE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_KNOWN_VRS = _LONG_VRS | {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN",
                          b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
_MAX_DEPTH = 64
_CHUNK = 1 << 16
_HARMLESS_REST = 64 << 10
"""Most bytes a walk that stopped may leave unchecked: pydicom builds at most 8,192 items of them."""
_MAX_TS_BYTES = 1 << 20


class _Stop(Exception):
    """The walk cannot go on (bytes that are not DICOM, or nested deeper than it follows)."""


class _Source:
    """A data set's bytes in order: the file itself, or its inflated stream (counted, capped)."""

    def __init__(self, fh: BinaryIO, deflated: bool, path: Path):
        self.fh, self.path = fh, path
        self.z = zlib.decompressobj(-zlib.MAX_WBITS) if deflated else None
        self.pos = 0  # bytes of the data set consumed
        self.inflated = 0
        self.buf = b""
        self.size = os.fstat(fh.fileno()).st_size

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
                raise _Stop(f"its deflate stream is damaged ({exc})") from exc
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

    def peek(self, n: int) -> bytes:
        data = self.read(n)
        self.pos -= len(data)
        if self.z is None:
            self.fh.seek(-len(data), 1)
        else:
            self.buf = data + self.buf
        return data

    def rest(self, limit: int) -> int:
        """Bytes of the data set after the position, counted no further than past ``limit``."""
        if self.z is None:
            here = self.fh.tell()
            return max(0, self.fh.seek(0, 2) - here)
        left = len(self.buf)
        self.buf = b""
        try:
            while left <= limit and self._fill():
                left += len(self.buf)
                self.buf = b""
        except _Stop:  # the deflate stream itself is damaged: what came out of it is the rest
            pass
        return left

    def skip(self, n: int) -> None:
        """Past ``n`` bytes; a length that runs past the end of the data stops the walk where it is."""
        if self.z is None:
            here = self.fh.tell()
            if here + n > self.size:
                raise _Stop("an element runs past the end of the data")
            self.fh.seek(n, 1)
            self.pos += n
            return
        while n > 0:
            got = len(self.read(min(n, MiB)))
            if not got:
                raise _Stop("an element runs past the end of the data")
            n -= got


class _Walk:
    """The elements of a data set as pydicom reads them: each data set (the top one, each item)
    explicit or implicit VR from its first element's bytes, an explicit element whose VR is not
    two capitals read as implicit, sequences followed wherever pydicom builds items."""

    def __init__(self, src: _Source, little: bool):
        self.src = src
        self.e = "<" if little else ">"
        self.items = 0

    def _looks_explicit(self, assumed: bool) -> bool:
        head = self.src.peek(6)
        if len(head) < 6:
            return assumed
        return 0x40 < head[4] < 0x5B and 0x40 < head[5] < 0x5B

    def dataset(self, end: int | None, depth: int, explicit: bool) -> None:
        """Elements up to ``end`` (None: up to an item delimiter or the end of the data)."""
        src, e = self.src, self.e
        while end is None or src.pos < end:
            head = src.read(8)
            if len(head) < 8:
                if end is not None and head:
                    raise _Stop("an item runs past the end of the data")
                return
            group, element = struct.unpack(e + "HH", head[:4])
            tag = group << 16 | element
            if tag in (_ITEM_END, _SEQ_END):
                return
            vr: bytes | None = None
            if explicit and group != 0xFFFE and (head[4:6] in _KNOWN_VRS or b"AA" <= head[4:6] <= b"ZZ"):
                vr = head[4:6]
                if vr in _LONG_VRS:
                    length = struct.unpack(e + "L", src.read(4).ljust(4, b"\0"))[0]
                else:
                    length = struct.unpack(e + "H", head[6:8])[0]
            else:  # implicit VR (pydicom reads an explicit element with a VR not of two capitals so too)
                length = struct.unpack(e + "L", head[4:8])[0]
            if length == _UNDEFINED:  # pydicom: UN is a sequence; no VR, one by the dictionary or its first tag
                if vr == b"UN" or vr is None and (_is_sequence(tag) or src.peek(4) == struct.pack(e + "L", _ITEM)):
                    vr = b"SQ"
                self.sequence(length, depth + 1, explicit, fragments=vr != b"SQ")
            elif vr == b"SQ" or (vr is None and _is_sequence(tag)) or (vr == b"UN" and _is_sequence(tag, length)):
                # a defined-length sequence (pydicom parses it when read; UN of a known sequence tag
                # under 64 KiB too, with the data set's encoding)
                self.sequence(length, depth + 1, explicit, fragments=False)
            else:
                src.skip(length)

    def sequence(self, length: int, depth: int, explicit: bool, fragments: bool) -> None:
        if depth > _MAX_DEPTH:
            raise _Stop(f"sequences nest more than {_MAX_DEPTH} deep")
        src, e = self.src, self.e
        end = None if length == _UNDEFINED else src.pos + length
        while end is None or src.pos < end:
            head = src.read(8)
            if len(head) < 8:
                raise _Stop("a sequence runs past the end of the data")
            group, element, item_length = struct.unpack(e + "HHL", head)
            tag = group << 16 | element
            if tag == _SEQ_END:
                return
            if tag != _ITEM:
                raise _Stop(f"an item tag expected in a sequence, ({group:04X},{element:04X}) found")
            if fragments:
                if item_length == _UNDEFINED:
                    raise _Stop("a fragment of undefined length")
                src.skip(item_length)
                continue
            self.items += 1
            if self.items > MAX_SEQUENCE_ITEMS:
                raise DataError(f"holds more than {MAX_SEQUENCE_ITEMS:,} sequence items, the limit (an enhanced CT "
                                "has about 9 per frame); refused before parsing them", src.path)
            # an item's data set is implicit VR in an implicit one, else as its first element looks
            item_explicit = explicit and self._looks_explicit(explicit)
            if item_length == _UNDEFINED:
                self.dataset(None, depth, item_explicit)
            else:
                item_end = src.pos + item_length
                self.dataset(item_end, depth, item_explicit)
                if src.pos < item_end:
                    src.skip(item_end - src.pos)


def _is_sequence(tag: int, length: int | None = None) -> bool:
    """The public dictionary has ``tag`` as a sequence (with ``length``: one pydicom parses as a
    sequence when stored as UN, under 0xFFFF bytes)."""
    from pydicom.datadict import dictionary_VR

    if length is not None and length >= 0xFFFF or tag >> 16 & 1:
        return False
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False


def _file_meta(fh: BinaryIO, path: Path) -> str | None:
    """The transfer syntax of the file meta group at the file's position, leaving the file at the
    data set; None without a meta group. The group is explicit VR little endian, or implicit VR
    where its first element's VR is not a known one, as pydicom reads it (its first element's VR
    not two capitals, or not one it can convert: it retries the group as implicit). The value is
    read at any length and stripped of NULs and spaces, as pydicom does."""
    first = fh.read(6)
    fh.seek(-len(first), 1)
    implicit = len(first) == 6 and first[4:6] not in _KNOWN_VRS
    ts = None
    while True:
        start = fh.tell()
        head = fh.read(8)
        if len(head) < 8 or struct.unpack("<H", head[:2])[0] != 0x0002:
            fh.seek(start)
            return ts
        element, vr = struct.unpack("<H", head[2:4])[0], head[4:6]
        if implicit:
            length = struct.unpack("<L", head[4:8])[0]
        elif vr in _LONG_VRS:
            length = struct.unpack("<L", fh.read(4).ljust(4, b"\0"))[0]
        else:
            length = struct.unpack("<H", head[6:8])[0]
        if length == _UNDEFINED:
            fh.seek(start)
            return ts
        if element == 0x0010:
            if length > _MAX_TS_BYTES:
                raise DataError(f"its transfer syntax UID is {length:,} bytes long (a UID has at most 64); refused",
                                path)
            ts = fh.read(length).decode("latin-1").strip("\0 \t\n\r\f\v")
        else:
            fh.seek(length, 1)


def check_dicom_limits(path: str | Path) -> None:
    """Refuse a DICOM file that inflates past :data:`~ctmask.core.limits.MAX_INFLATED_BYTES` or holds
    more than :data:`~ctmask.core.limits.MAX_SEQUENCE_ITEMS` sequence items, or that cannot be
    checked for them.

    Reads the file once, streaming (memory: a few MiB whatever the file declares). Where the bytes
    stop making sense as DICOM (or sequences nest past 64 deep), the walk stops: with no more than
    64 KiB left (a truncated or padded file: the decoder then says what is wrong) the file goes on
    to pydicom, else it is refused, since pydicom would parse (and inflate) the rest unchecked.

    Raises:
        DataError: naming the file and the limit, or where and why it could not be checked.
        OSError: the file cannot be read.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(132)
        fh.seek(132 if head[128:132] == b"DICM" else 0)
        ts = _file_meta(fh, path)
        start = fh.tell()
        little = ts != _EXPLICIT_BE
        if ts is None:  # no meta: big endian when the first group reads as >= 1024 little endian, as pydicom
            first = fh.read(6)
            fh.seek(start)
            little = not (first[4:6] in _KNOWN_VRS and len(first) == 6 and struct.unpack("<H", first[:2])[0] >= 1024)
        src = _Source(fh, ts == DEFLATED, path)
        walk = _Walk(src, little)
        try:  # the top data set is explicit or implicit VR as its first element looks, whatever the meta says
            walk.dataset(None, 0, walk._looks_explicit(ts != _IMPLICIT_LE))
        except _Stop as stop:
            at = src.pos
            if ts is None and head[128:132] != b"DICM" and at <= 12:
                # Not one element makes sense, with no preamble and no file meta: these bytes are not
                # DICOM (a suffix-less PNG, say), so pydicom refuses them at that first element; the
                # readers name what the file is.
                return
            rest = src.rest(_HARMLESS_REST)
            if rest > _HARMLESS_REST:
                where = "its inflated data set" if src.z is not None else "its data set"
                raise DataError(f"cannot be checked against the input limits: {stop} at byte {at:,} of {where}, "
                                f"with more than {_HARMLESS_REST >> 10} KiB after it; refused rather than parsed "
                                "unchecked (a decompression bomb?)", path) from None


# ---------------------------------------------------------------- compressed frames


RLE_LOSSLESS = "1.2.840.10008.1.2.5"
_RLE_SLACK = 1024
"""Bytes an RLE segment may decode to past Rows x Columns (encoders pad a segment to even length)."""
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}  # 0xF7: JPEG-LS
_JPEG_HEADER_BYTES = 1 << 20


def frame_bytes(rows: int, cols: int, samples: int, bits_allocated: int) -> int:
    """Bytes of one decoded frame: ``rows x cols x samples`` values of ``bits_allocated`` bits."""
    return rows * cols * samples * max(1, (bits_allocated + 7) // 8)


def check_compressed_frame(frame: bytes, transfer_syntax: str, rows: int, cols: int, samples: int,
                           bits_allocated: int, path: str | Path) -> None:
    """Refuse one encapsulated frame whose own headers make it decode to more than the frame its data
    set declares (``rows x cols x samples`` values of ``bits_allocated`` bits), before a decoder
    allocates it.

    * RLE: each segment's runs are counted (not expanded) and may make at most ``rows x cols``
      bytes plus 1 KiB; pydicom's decoder would build every segment whole, with no cap.
    * JPEG, JPEG-LS (SOF marker) and JPEG 2000 / HTJ2K (SIZ marker): the image size and components
      the codestream declares, which the decoders allocate, may not exceed the data set's.
    * Any other compression: refused (pydicom decodes none other).

    Raises:
        DataError: naming the file, what the frame declares and the limit.
    """
    expected = frame_bytes(rows, cols, samples, bits_allocated)
    if expected > MAX_SLICE_BYTES:
        raise DataError(f"a frame of {rows}x{cols}x{samples} values of {bits_allocated} bits holds {mib(expected)}, "
                        f"more than the limit of {mib(MAX_SLICE_BYTES)} (refused before decoding it)", path)
    ts = str(transfer_syntax)
    if ts == RLE_LOSSLESS:
        return _check_rle(frame, rows * cols, path)
    found = _jpeg_size(frame) if ts.startswith("1.2.840.10008.1.2.4.") and not _is_j2k(ts) else None
    if found is None and ts.startswith("1.2.840.10008.1.2.4."):
        found = _j2k_size(frame)
    if found is None:
        raise DataError(f"its pixel data compressed with transfer syntax {ts} has no JPEG, JPEG-LS or JPEG 2000 "
                        "header telling the frame's size; refused before decoding it", path)
    width, height, components = found
    if width * height > rows * cols or components > samples:
        raise DataError(f"a compressed frame declares {width}x{height} pixels of {components} components where the "
                        f"data set declares {cols}x{rows} of {samples}; refused before decoding it", path)


def _check_rle(frame: bytes, plane: int, path: str | Path) -> None:
    if len(frame) < 64:
        return  # no RLE header: pydicom's decoder says so
    header = struct.unpack("<16L", frame[:64])
    count = header[0]
    if not 1 <= count <= 15:
        return
    bounds = [*header[1 : count + 1], len(frame)]
    limit = plane + _RLE_SLACK
    for i in range(count):
        made = _rle_output(frame, bounds[i], max(bounds[i], bounds[i + 1]), limit)
        if made > limit:
            raise DataError(f"an RLE segment decodes to more than the {plane:,} bytes of its frame's plane "
                            f"(Rows x Columns) plus {_RLE_SLACK:,}; refused before decoding it (a decompression "
                            "bomb?)", path)


def _rle_output(src: bytes, pos: int, end: int, limit: int) -> int:
    """Bytes an RLE segment ``src[pos:end]`` decodes to (as pydicom's decoder does), counted up to
    past ``limit``; each run counts at least one byte, so no-op runs (-128) end the count too."""
    end = min(end, len(src))
    made = 0
    while pos < end and made <= limit:
        n = src[pos]
        pos += 1
        if n > 128:  # the next byte 257 - n times
            made += 257 - n if pos < end else 1
            pos += 1
        elif n < 128:  # the next n + 1 bytes
            made += max(1, min(n + 1, end - pos))
            pos += n + 1
        else:
            made += 1
    return made


def _is_j2k(ts: str) -> bool:
    return ts.rsplit(".", 1)[-1] in ("90", "91", "92", "93", "201", "202", "203")


def _jpeg_size(frame: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) of a JPEG / JPEG-LS codestream's SOF marker, or None."""
    pos, end = 2, min(len(frame), _JPEG_HEADER_BYTES)
    if frame[:2] != b"\xff\xd8":
        return None
    while pos + 4 <= end:
        if frame[pos] != 0xFF:
            return None
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        if marker == 0xDA:  # start of scan before any frame header
            return None
        length = struct.unpack(">H", frame[pos + 2 : pos + 4])[0]
        if marker in _JPEG_SOF and pos + 10 <= end:
            height, width = struct.unpack(">HH", frame[pos + 5 : pos + 9])
            return width, height, frame[pos + 9]
        pos += 2 + length
    return None


def _j2k_size(frame: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) of a JPEG 2000 codestream's SIZ marker (found in a JP2 file too),
    or None."""
    at = frame.find(b"\xff\x4f\xff\x51", 0, _JPEG_HEADER_BYTES)
    if at < 0 or at + 42 > len(frame):
        return None
    xsiz, ysiz, xo, yo = struct.unpack(">4L", frame[at + 8 : at + 24])
    components = struct.unpack(">H", frame[at + 40 : at + 42])[0]
    return max(0, xsiz - xo), max(0, ysiz - yo), components


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


def gzip_holds(path: str | Path, n: int) -> int:
    """Bytes the gzip file ``path`` decompresses to, counted no further than ``n`` (a truncated or
    damaged stream counts what it gave). Memory: one decoder and 1 MiB; work: inflating up to ``n``."""
    with open(path, "rb") as fh:
        fh.seek(-4, 2)
        if fh.tell() > 0 and struct.unpack("<L", fh.read(4))[0] == n % (1 << 32):
            return n  # the trailer's size (of the last member, modulo 4 GiB) agrees: trusted without inflating
    cursor = GzipCursor(path, checkpoint_bytes=1 << 62)
    try:
        while cursor.pos < n and cursor._next(min(MiB, n - cursor.pos)):
            pass
    except (EOFError, OSError, zlib.error):
        pass
    finally:
        cursor.close()
    return min(cursor.pos, n)
