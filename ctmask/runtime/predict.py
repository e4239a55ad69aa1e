"""Batch prediction over image files, with pre-processing driven by the graph spec.

Slices are decoded by :func:`ctmask.scans.batch.load_batch`, the same decoding training
uses; the input size, DICOM window and body crop come from the model's metadata.
A model trained on body-cropped slices (``train-cls --crop``) needs each slice's crop
box: :class:`CropBoxes` reads them from a COVIDx-CT split file. A slice that cannot be
read (or has no box) becomes a :class:`Failure` (path and reason) and the others go on.
The next batch is decoded on a worker thread while the current one runs.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ctmask.core.errors import ConfigError, DataError
from ctmask.core.fileio import atomic_path, output_error
from ctmask.core.spec import GraphSpec
from ctmask.core.spreadsheet import safe_row
from ctmask.data.covidx import Box, SplitEntry, read_split
from ctmask.scans.sniff import IMAGE_SUFFIXES
from ctmask.scans.types import Failure


@dataclass
class Prediction:
    """One slice's result. ``rois`` holds the top non-padding rows (score, dx, dy, dw, dh).

    For slices of scans (:mod:`ctmask.runtime.batch_run`) it also names the slice (``key``:
    path, plus ``#frame`` inside a multi-frame file or volume; ``label`` for people), its
    ``study`` and ``series``, its ``position`` along the slice normal, how it was rendered
    (``kind``), its pixel ``size`` [H, W], and ``boxes``: the top RoIs' boxes (x1, y1, x2, y2)
    in that slice's own pixel frame, row for row with ``rois``; ``identity`` (written as ``id``)
    names the slice whatever its path (:func:`ctmask.scans.types.with_identities`);
    ``detections``: the lesion detections for readers (:mod:`ctmask.runtime.detections`),
    ``{"box", "score", "lesion"}`` each, boxes in the slice's own pixel frame, highest score first.
    """

    file: str
    class_name: str
    class_index: int
    probs: dict[str, float]
    rois: list[list[float]]
    n_rois: int
    key: str | None = None
    label: str | None = None
    study: str | None = None
    series: str | None = None
    position: float | None = None
    frame: int | None = None
    boxes: list[list[float]] | None = None
    kind: str | None = None
    size: list[int] | None = None
    overlay: str | None = None
    identity: str | None = None
    detections: list[dict] | None = None

    def to_dict(self) -> dict:
        d = {"file": self.file, "class": self.class_name, "class_index": self.class_index,
             "probs": self.probs, "n_rois": self.n_rois, "top_rois": self.rois}
        renamed = {"boxes": "top_boxes", "identity": "id"}
        for name in ("key", "identity", "label", "study", "series", "position", "frame", "boxes", "kind", "size",
                     "overlay", "detections"):
            value = getattr(self, name)
            if value is not None:
                d[renamed.get(name, name)] = value
        return d


def collect_images(inputs: list[str | Path]) -> tuple[list[Path], list[Failure]]:
    """Expand files and folders (recursively, sorted) into image files.

    Folders contribute files with an image suffix (:data:`IMAGE_SUFFIXES`) and single-slice
    DICOM files without one (``IM0001``, as a PACS export names them; found by
    :func:`ctmask.scans.listing.collect_sources`); a file given by name is taken whatever its
    suffix. Multi-slice files (multi-frame DICOM, NIfTI) are failures here: calibration,
    parity and bench take single slices (``infer`` reads volumes). Paths that do not exist
    become failures. Overlay PNGs an ``infer --overlays`` run drew are no slices: left out,
    counted in one :class:`~ctmask.core.errors.CtmaskWarning`.
    """
    files, failures = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            all_files = [p for p in path.rglob("*") if p.is_file()]
            found = {p for p in all_files if p.suffix.lower() in IMAGE_SUFFIXES}
            n_failed = len(failures)
            if len(found) < len(all_files):  # files without an image suffix: DICOM series, volumes
                single, multi = _dicom_slices(path, failures)
                found = (found | single) - multi
            if not found and len(failures) == n_failed:
                failures.append(Failure(str(path), "folder holds no slices (images, DICOM)"))
            files.extend(sorted(found))
        elif path.is_file():
            files.append(path)
        else:
            failures.append(Failure(str(path), "no such file or folder"))
    from ctmask.runtime.overlays import is_overlay

    drawn = {p for p in files if is_overlay(p)}
    if drawn:
        import warnings

        from ctmask.core.errors import CtmaskWarning

        warnings.warn(f"skipped {len(drawn)} overlay PNG(s) a ctmask run drew (e.g. {min(drawn)}): overlays are no "
                      "CT slices", CtmaskWarning, stacklevel=2)
        files = [p for p in files if p not in drawn]
    return files, failures


def _dicom_slices(folder: Path, failures: list[Failure]) -> tuple[set[Path], set[Path]]:
    """The single-slice and the multi-slice files :func:`ctmask.scans.listing.collect_sources`
    finds in ``folder`` (suffix-less DICOM included); the files it refuses, and multi-slice
    files, become ``failures``. Its series-ordering warnings concern ``infer`` and are not
    shown here."""
    import warnings

    from ctmask.scans.listing import collect_sources

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refs, refused = collect_sources([folder])
    failures.extend(refused)
    single, multi = set(), set()
    for ref in refs:
        (single if ref.frame is None else multi).add(Path(ref.path))
    for path in sorted(multi):
        failures.append(Failure(str(path), "a multi-slice file (multi-frame DICOM or NIfTI volume): this command "
                                           "takes single slices; `ctmask infer` reads volumes"))
    return single - multi, multi


class CropBoxes:
    """Body crop boxes per slice, for models trained on cropped slices.

    Args:
        boxes: (image path, box) pairs; box = (xmin, ymin, xmax, ymax), pixels, max exclusive.
        source: where they came from (named in failures).
    """

    def __init__(self, boxes: list[tuple[Path, Box]], source: str | Path):
        self.source = Path(source)
        self.by_path: dict[Path, Box] = {}
        by_name: dict[str, set[Box]] = {}
        for path, box in boxes:
            self.by_path[Path(path).resolve()] = tuple(box)
            by_name.setdefault(Path(path).name, set()).add(tuple(box))
        # A bare file name identifies a slice only when it is not listed with two boxes.
        self.by_name = {name: next(iter(b)) for name, b in by_name.items() if len(b) == 1}

    @classmethod
    def from_split(cls, split_file: str | Path) -> CropBoxes:
        """Boxes of a COVIDx-CT split file (``filename class xmin ymin xmax ymax``; class ignored).

        Raises:
            DataError: the split file is missing or malformed, or lists the same slice twice
                with different boxes (file and line named).
        """
        entries = read_split(split_file, check_exists=False)
        first: dict[Path, SplitEntry] = {}
        for e in entries:
            key = e.path.resolve()
            seen = first.setdefault(key, e)
            if seen.box != e.box:
                raise DataError(
                    f"line {e.line}: {e.path.name} is listed again with another box {list(e.box)} "
                    f"(line {seen.line} gives {list(seen.box)}); which one the slice was cropped with is ambiguous",
                    split_file,
                )
        return cls([(e.path, e.box) for e in entries], split_file)

    def lookup(self, path: str | Path) -> Box | None:
        """The box of ``path``: listed with the same resolved path, else by file name."""
        path = Path(path)
        return self.by_path.get(path.resolve()) or self.by_name.get(path.name)


def check_crop(spec: GraphSpec, boxes: CropBoxes | None, uncropped: bool) -> None:
    """Refuse to run a model trained on body-cropped slices without crop boxes.

    Raises:
        ConfigError: ``spec.crop`` and neither ``boxes`` nor ``uncropped``.
    """
    if spec.crop and boxes is None and not uncropped:
        raise ConfigError(
            "this model was trained on slices cropped to their body box (train-cls --crop), so every slice needs "
            "its crop box",
            hint="pass --boxes SPLIT_FILE (COVIDx-CT format: 'filename class xmin ymin xmax ymax'; the class is "
                 "ignored), or --uncropped to run on whole slices anyway (off the training distribution)",
        )


CSV_COLUMNS = ("file", "class", "class_index", "n_rois", "top_roi_score")
SCAN_COLUMNS = ("key", "id", "label", "study", "series", "position", "frame", "kind", "size", "top_boxes", "overlay")
"""Extra CSV columns of slices of scans (``PredictionWriter(scan_columns=True)``)."""


def journal_path(path: str | Path) -> Path:
    """Where a Parquet output's records wait while a run makes them: ``p.parquet`` -> ``p.parquet.journal.jsonl``,
    beside the file the path resolves to (every spelling of the output finds the journal of a killed run)."""
    path = Path(os.path.realpath(path))
    return path.with_name(path.name + ".journal.jsonl")


class PredictionWriter:
    """Writes predictions as JSON lines (``.jsonl``), CSV (``.csv``) or Parquet (``.parquet``,
    :mod:`ctmask.runtime.parquet`) as they are made.

    JSON lines and CSV rows go straight into the file and :meth:`flush` (after every batch) hands
    them to the system, so at any moment the file holds whole records, every one made so far,
    and a run killed at any point is resumed from its last batch (``infer --resume``, which cuts
    off a torn last line). A Parquet file cannot grow: its records go to a journal beside it
    (:func:`journal_path`, JSON lines, flushed the same way) and leaving the ``with`` block writes
    the Parquet file (atomically) from every record, then removes the journal. Nothing is
    touched before the first record: a run that fails earlier leaves an earlier file as it was.

    Args:
        path: the output file.
        class_names: the model's classes (CSV and Parquet columns).
        scan_columns: write the CSV columns of slices of scans.
        resume: an earlier run's output to continue (:class:`ctmask.runtime.batch_run.Resume`:
            its records, how many of its bytes are whole records, its CSV header); ``None``
            starts the file anew at the first record.
    """

    def __init__(self, path: str | Path, class_names: tuple[str, ...], scan_columns: bool = False,
                 resume=None):
        self.path = Path(path)
        self.scan_columns = scan_columns
        suffix = self.path.suffix.lower()
        if suffix not in (".jsonl", ".csv", ".parquet"):
            raise ConfigError(f"cannot tell the output format from {self.path.name!r}: use .jsonl, .csv or .parquet")
        self.format = suffix[1:]
        self.class_names = class_names
        self.resume = resume
        self.count = 0
        self._fh: io.TextIOBase | None = None
        self._rows: list[dict] = list(resume.records) if resume is not None and self.format == "parquet" else []

    @property
    def header(self) -> list[str]:
        """The CSV header row."""
        return [*CSV_COLUMNS[:3], *(f"prob_{c}" for c in self.class_names), *CSV_COLUMNS[3:],
                *(SCAN_COLUMNS if self.scan_columns else ())]

    def __enter__(self) -> PredictionWriter:
        return self

    def _open(self) -> None:
        """Open the file (the journal for Parquet) at the first record: append to an earlier run's
        whole records, or start anew."""
        target = journal_path(self.path) if self.format == "parquet" else self.path
        target.parent.mkdir(parents=True, exist_ok=True)
        if self.resume is not None and target.exists():
            if self.format == "csv" and self.resume.header != self.header:
                self._rewrite()  # an older ctmask's columns: written once in these, then appended to
            else:
                os.truncate(target, self.resume.whole_bytes)  # a torn last line (a killed run) is cut off
            mode = "a"
        else:
            mode = "w"
            if self.format == "parquet" and self.resume is None:
                self.path.unlink(missing_ok=True)  # a new run replaces the file from its first record on
        # surrogateescape: a file name that is not UTF-8 goes out byte for byte (and --resume reads it back)
        self._fh = open(target, mode, newline="", encoding="utf-8", errors="surrogateescape")
        if self.format == "csv":
            self._csv = csv.writer(self._fh)
            if self._fh.tell() == 0:
                self._csv.writerow(self.header)

    def _rewrite(self) -> None:
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="", encoding="utf-8",
                                                 errors="surrogateescape") as fh:
            self._fh, self._csv = fh, csv.writer(fh)
            self._csv.writerow(self.header)
            for rec in self.resume.records:
                self._write_line(rec)

    def write(self, pred: Prediction) -> None:
        self.write_record(pred.to_dict())

    def write_record(self, rec: dict) -> None:
        """Write one record as :meth:`Prediction.to_dict` gives it (it reaches the file at the
        next :meth:`flush`).

        Raises:
            DataError: the record cannot be written (disk full ...), naming the output file.
        """
        try:
            if self._fh is None:
                self._open()
            self._write_line(rec)
        except OSError as exc:
            raise output_error(exc, self.path) from None
        if self.format == "parquet":
            self._rows.append(rec)
        self.count += 1

    def _write_line(self, rec: dict) -> None:
        if self.format in ("jsonl", "parquet"):
            self._fh.write(json.dumps(rec) + "\n")
        else:
            rois = rec.get("top_rois") or []
            top = rois[0][0] if rois else rec.get("top_roi_score", 0.0)
            row = [rec["file"], rec["class"], rec["class_index"], *(rec["probs"].get(c, "") for c in self.class_names),
                   rec.get("n_rois", ""), top]
            if self.scan_columns:
                row += ["" if rec.get(k) is None else json.dumps(rec[k]) if isinstance(rec[k], list) else rec[k]
                        for k in SCAN_COLUMNS]
            self._csv.writerow(safe_row(row))  # text cells never start like a spreadsheet formula

    def flush(self) -> None:
        """Hand the records written so far to the system (after every batch): a run killed from
        here on keeps them."""
        if self._fh is not None:
            try:
                self._fh.flush()
            except OSError as exc:
                raise output_error(exc, self.path) from None

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self._fh is None and exc_type is None:
                self._open()  # no record at all: still an (empty) output
            if self._fh is not None:
                self._fh.flush()
                if exc_type is None:
                    os.fsync(self._fh.fileno())
                self._fh.close()
            if self.format == "parquet" and exc_type is None:
                from ctmask.runtime.parquet import write_slices

                with atomic_path(self.path) as tmp:
                    write_slices(tmp, self._rows, self.class_names)
                journal_path(self.path).unlink(missing_ok=True)
        except OSError as err:
            if exc_type is None:
                raise output_error(err, self.path) from None
