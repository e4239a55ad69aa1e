"""Reader and writer of COVIDx-CT split files.

A split file has one slice per line::

    filename class xmin ymin xmax ymax

whitespace separated; ``class`` is 0 normal, 1 common pneumonia, 2 COVID-19 and the box
is the body crop in pixels (xmax/ymax exclusive, as :func:`ctmask.core.preprocess.crop_box`
uses it). Blank lines and lines starting with ``#`` are ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from ctmask.core.errors import DataError
from ctmask.core.fileio import write_text_atomic
from ctmask.core.presets import CLASS_NAMES

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class SplitEntry:
    """One slice of a split.

    Attributes:
        path: image file (resolved against the image directory).
        label: slice class, 0 normal, 1 pneumonia, 2 COVID-19.
        box: body crop (xmin, ymin, xmax, ymax), int pixels, xmax/ymax exclusive.
        line: line number in the split file it was read from (0 if not read from one;
            not compared).
    """

    path: Path
    label: int
    box: Box
    line: int = field(default=0, compare=False, repr=False)


Row = Union[SplitEntry, Sequence]


def default_image_dir(split_file: str | Path) -> Path:
    """``<split parent>/images`` if it is a folder, else the split file's parent."""
    parent = Path(split_file).parent
    images = parent / "images"
    return images if images.is_dir() else parent


def _parse_line(text: str, split_file: Path, lineno: int) -> tuple[str, int, Box]:
    """Parse one non-comment line into (filename, label, box); errors name file and line."""
    where = f"line {lineno}"
    parts = text.split()
    if len(parts) != 6:
        raise DataError(
            f"{where}: expected 6 fields 'filename class xmin ymin xmax ymax', "
            f"found {len(parts)}: {text.strip()!r}",
            split_file,
        )
    name = parts[0]
    try:
        label = int(parts[1])
    except ValueError:
        raise DataError(f"{where}: class {parts[1]!r} is not an integer", split_file) from None
    if not 0 <= label < len(CLASS_NAMES):
        raise DataError(
            f"{where}: class {label} out of range; expected 0..{len(CLASS_NAMES) - 1} "
            f"({', '.join(CLASS_NAMES)})",
            split_file,
        )
    try:
        box = tuple(int(float(v)) for v in parts[2:])
    except ValueError:
        raise DataError(f"{where}: box {parts[2:]} is not numeric", split_file) from None
    except OverflowError:  # inf, 1e400
        raise DataError(f"{where}: box {parts[2:]} is not finite", split_file) from None
    x0, y0, x1, y1 = box
    if x0 < 0 or y0 < 0 or x1 <= x0 or y1 <= y0:
        raise DataError(
            f"{where}: bad box (xmin={x0}, ymin={y0}, xmax={x1}, ymax={y1}); "
            "need 0 <= xmin < xmax and 0 <= ymin < ymax",
            split_file,
        )
    return name, label, box  # type: ignore[return-value]


def read_split(
    split_file: str | Path,
    image_dir: str | Path | None = None,
    check_exists: bool = True,
) -> list[SplitEntry]:
    """Read a COVIDx-CT split file.

    Args:
        split_file: text file, one ``filename class xmin ymin xmax ymax`` line per slice.
        image_dir: folder the filenames are relative to; defaults to
            :func:`default_image_dir` of ``split_file``.
        check_exists: if True, every listed image must exist.

    Returns:
        Entries in file order (at least one).

    Raises:
        DataError: the split file is missing or empty, a line is malformed (the error names
            the file and line number), or a listed image is missing.
    """
    split_file = Path(split_file)
    if not split_file.is_file():
        raise DataError("split file does not exist", split_file)
    root = default_image_dir(split_file) if image_dir is None else Path(image_dir)
    try:
        # utf-8-sig: a byte-order mark (Windows editors) is not part of the first file name.
        lines = split_file.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read split file ({exc})", split_file) from None
    entries: list[SplitEntry] = []
    for lineno, text in enumerate(lines, start=1):
        stripped = text.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name, label, box = _parse_line(stripped, split_file, lineno)
        path = root / name
        if check_exists and not path.is_file():
            raise DataError(f"image does not exist (listed in {split_file} line {lineno})", path)
        entries.append(SplitEntry(path=path, label=label, box=box, line=lineno))
    if not entries:
        raise DataError("split file lists no slices", split_file)
    return entries


def _format_row(row: Row) -> str:
    """One split line; a SplitEntry contributes its file name only (not its folder)."""
    if isinstance(row, SplitEntry):
        name, label, box = row.path.name, row.label, row.box
    else:
        name, label, *box = row
        if len(box) == 1:  # (name, label, (x0, y0, x1, y1))
            box = list(box[0])
    if len(box) != 4:
        raise ValueError(f"split row needs 4 box values, got {box!r}")
    if any(c.isspace() for c in str(name)):
        raise ValueError(f"file name {name!r} contains whitespace")
    return f"{name} {int(label)} " + " ".join(str(int(v)) for v in box)


def write_split(path: str | Path, entries_or_rows: Iterable[Row]) -> None:
    """Write a split file atomically.

    Args:
        path: destination split file.
        entries_or_rows: :class:`SplitEntry` objects (their ``path.name`` is written) or
            rows ``(filename, label, xmin, ymin, xmax, ymax)`` /
            ``(filename, label, (xmin, ymin, xmax, ymax))``.
    """
    text = "".join(_format_row(r) + "\n" for r in entries_or_rows)
    write_text_atomic(path, text)
