"""Batch prediction over real scans: slices of files, DICOM series and NIfTI volumes.

:func:`predict_sources` decodes every :class:`~ctmask.scans.types.SliceRef` with
:func:`ctmask.scans.batch.load_batch` (on a worker thread, one batch ahead of the runner:
decoded, cropped and resized exactly as training did), runs the batch, and yields one
:class:`~ctmask.runtime.predict.Prediction` per slice (with its top RoI boxes mapped back to
the slice's own pixel frame) or one :class:`~ctmask.scans.types.Failure` per slice that
could not be read. Nothing a single input holds can stop the run: every decoding error of
any kind is that slice's failure.

:class:`Resume` reads an earlier run's output file so ``infer --resume`` predicts only what
is missing and writes the old records and the new ones into one new file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctmask.core.errors import ConfigError, CtmaskWarning, DataError
from ctmask.core.spec import INPUT, GraphSpec
from ctmask.core.spreadsheet import restore_cell
from ctmask.runtime.predict import CropBoxes, Prediction, check_crop
from ctmask.runtime.runner import Runner
from ctmask.scans.batch import Loaded, ReadOptions, load_batch
from ctmask.scans.types import DecodedSlice, Failure, SliceRef


@dataclass(frozen=True)
class PredictOptions:
    """How slices are predicted: the options :func:`predict_sources` and
    :func:`ctmask.runtime.predict.predict_files` take.

    Attributes:
        batch_size: slices per inference call (the last batch may be smaller).
        top_rois: RoI rows kept per slice in the records.
        boxes: per-slice body crop boxes; required when the model was trained on cropped
            slices (``spec.crop``), ignored otherwise.
        uncropped: run a cropping model on whole slices anyway (off its training
            distribution: the caller should say so).
        keep_pixels: keep each decoded slice (for overlays).
        read: how slices are read.
    """

    batch_size: int = 8
    top_rois: int = 5
    boxes: CropBoxes | None = None
    uncropped: bool = False
    keep_pixels: bool = False
    read: ReadOptions = ReadOptions()


def slice_predictions(loaded: Loaded, outputs: dict[str, np.ndarray], spec: GraphSpec,
                      top_rois: int) -> list[Prediction]:
    """Per-slice records of one batch, RoI boxes in each slice's own pixel frame."""
    from ctmask.runtime.detections import detect
    from ctmask.runtime.overlays import boxes_to_source, top_boxes

    preds = []
    for i, ref in enumerate(loaded.refs):
        probs = outputs["probs"][i]
        rois = outputs["rois"][i]
        real = rois[rois[:, 0] > 0]  # zero rows are padding
        k = int(probs.argmax())
        boxes: list[list[float]] | None = None
        found: list[dict] | None = None
        if "boxes" in outputs:
            b, _ = top_boxes(outputs, i, top_rois)
            src = boxes_to_source(b, spec.image_size, loaded.shapes[i], loaded.crops[i])
            boxes = [[round(float(v), 2) for v in row] for row in src]
            every = boxes_to_source(outputs["boxes"][i], spec.image_size, loaded.shapes[i], loaded.crops[i])
            labels = outputs["labels"][i] if "labels" in outputs else None
            found = [d.to_dict() for d in detect(rois[:, 0], every, labels)]
        preds.append(Prediction(
            file=ref.path,
            class_name=spec.class_names[k],
            class_index=k,
            probs={name: round(float(v), 6) for name, v in zip(spec.class_names, probs)},
            rois=[[round(float(v), 6) for v in row] for row in real[:top_rois]],
            n_rois=int(len(real)),
            key=ref.key,
            identity=ref.identity or None,
            label=ref.label or ref.key,
            study=ref.study or ref.path,
            series=ref.series or ref.path,
            position=ref.position,
            frame=ref.frame,
            boxes=boxes,
            detections=found,
            kind=loaded.kinds[i],
            size=list(loaded.shapes[i]),
        ))
    return preds


def predict_sources(
    runner: Runner,
    refs: list[SliceRef],
    options: PredictOptions = PredictOptions(),
    on_batch: Callable[[int], None] | None = None,
) -> Iterator[tuple[Prediction, DecodedSlice | None] | Failure]:
    """Predict every slice, ``options.batch_size`` per runner call, in input order.

    The next batch is decoded on a worker thread while the current one runs. ``on_batch`` is
    called with the number of slices handled after each batch.

    Yields:
        ``(prediction, decoded slice or None)`` (the decoded pixels only with
        ``options.keep_pixels``, for overlays) or a :class:`Failure` per slice.

    Raises:
        ConfigError: a bad batch size, or a cropping model without ``boxes`` or ``uncropped``.
    """
    batch_size, boxes, keep_pixels, opts = options.batch_size, options.boxes, options.keep_pixels, options.read
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    spec = runner.spec
    check_crop(spec, boxes, options.uncropped)
    if not spec.crop or options.uncropped:
        boxes = None
    chunks = [refs[i : i + batch_size] for i in range(0, len(refs), batch_size)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load_batch, chunks[0], spec, boxes, keep_pixels, opts) if chunks else None
        for n, chunk in enumerate(chunks):
            loaded = pending.result()
            if n + 1 < len(chunks):
                pending = pool.submit(load_batch, chunks[n + 1], spec, boxes, keep_pixels, opts)
            yield from loaded.failures
            if loaded.refs:
                preds = slice_predictions(loaded, runner.infer({INPUT: loaded.batch}), spec, options.top_rois)
                yield from zip(preds, loaded.decoded)
            if on_batch is not None:
                on_batch(len(chunk))


def predict_files(
    runner: Runner,
    files: list[Path],
    options: PredictOptions | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Iterator[Prediction | Failure]:
    """Predict every file, ``batch_size`` slices per runner call, in input order: the
    single-slice form of :func:`predict_sources` (same decoding, batching and records).

    Args:
        runner: an active runner.
        files: image files.
        options: batch size, RoI rows, crop boxes, ... (:class:`PredictOptions`;
            default: its defaults).
        on_batch: called with the number of files handled after each batch.

    Yields:
        a :class:`Prediction` or :class:`Failure` per file.

    Raises:
        ConfigError: a bad batch size, or a cropping model without ``boxes`` or ``uncropped``.
    """
    refs = [SliceRef(str(p)) for p in files]
    for item in predict_sources(runner, refs, options or PredictOptions(), on_batch):
        yield item if isinstance(item, Failure) else item[0]


class Resume:
    """The records of an earlier run's output (JSONL, CSV, or Parquet and its journal), for
    ``infer --resume``: checked line by line before anything runs.

    Records are matched to slices on their ``id`` (:func:`ctmask.scans.types.with_identities`:
    SOPInstanceUID, or the file's content hash), so another spelling of the inputs or a moved
    archive finds them; records of an older ctmask, without ``id``, on their ``key``. A last line
    without its line end (a run killed while writing it) is left out: :attr:`whole_bytes` says
    where the whole records end, and the writer cuts the rest off before appending. Each slice
    has one record: a file that holds one twice is refused. A Parquet journal whose records are
    all in the Parquet file already (a run killed after writing the Parquet file, before
    removing its journal) is a leftover: it is left out, and the writer empties it.

    Args:
        path: the output file; a missing file is an empty resume (first run).

    Raises:
        DataError: the file (or a line of it, named) is not a ctmask predictions file: not JSON,
            nested too deep, a NaN / Infinity or a probability outside [0, 1], a field of the
            wrong type, a slice whose record an earlier line holds already.
    """

    def __init__(self, path: str | Path):
        from ctmask.runtime.predict import journal_path

        self.path = Path(path)
        self.records: list[dict] = []
        self.whole_bytes = 0
        self.header: list[str] | None = None
        self.torn = False
        self.ids: set[str] = set()
        self.keys_without_id: set[str] = set()
        self._first: dict[str, str] = {}  # a slice's id (or key) -> where its record is
        if self.path.suffix.lower() == ".parquet":
            if self.path.exists():
                from ctmask.runtime.parquet import read_slices

                for n, rec in enumerate(read_slices(self.path), 1):
                    self._add(rec, f"row {n}", self.path)
            journal = journal_path(self.path)
            if journal.exists():
                lines = list(self._parse_jsonl(journal))
                if lines and self.path.exists() and all(_slice_id(rec) in self._first for _, rec in lines):
                    self.whole_bytes = 0  # the Parquet file was written from them: the writer empties the journal
                    warnings.warn(f"{journal}: the {len(lines)} record(s) of this journal are in {self.path.name} "
                                  "already (a run killed after writing it); the journal is left out and emptied",
                                  CtmaskWarning, stacklevel=2)
                else:
                    for n, rec in lines:
                        self._add(rec, f"line {n}", journal)
            return
        if not self.path.exists():
            return
        if self.path.suffix.lower() == ".jsonl":
            self._read_jsonl(self.path)
        else:
            self._read_csv(self.path)

    def _whole(self, path: Path, csv_rows: bool = False) -> str:
        """The file's text up to its last line end (what a killed run left whole); CSV rows end
        in CRLF (a name inside a row may hold a bare LF) unless the file has none."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read the earlier output for --resume ({exc.__class__.__name__})", path) from None
        end_of_row = b"\r\n" if csv_rows and b"\r\n" in data else b"\n"
        cut = data.rfind(end_of_row)
        self.whole_bytes = 0 if cut < 0 else cut + len(end_of_row)
        self.torn = self.whole_bytes < len(data)
        return data[: self.whole_bytes].decode("utf-8", errors="surrogateescape")

    def _read_jsonl(self, path: Path) -> None:
        for n, rec in self._parse_jsonl(path):
            self._add(rec, f"line {n}", path)

    def _parse_jsonl(self, path: Path) -> Iterator[tuple[int, object]]:
        """``(line number, JSON value)`` of every whole line."""
        for n, line in enumerate(self._whole(path).split("\n")[:-1], 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line, parse_constant=_no_constant)
            except RecursionError:
                raise DataError(f"line {n} is nested too deeply: not a ctmask predictions file", path) from None
            except ValueError as exc:
                raise DataError(f"line {n} is not JSON a ctmask run writes ({str(exc)[:120]}): not a ctmask "
                                "predictions file", path) from None
            yield n, rec

    def _read_csv(self, path: Path) -> None:
        text = self._whole(path, csv_rows=True)
        reader = csv.reader(io.StringIO(text, newline=""))
        try:
            self.header = next(reader, None)
            for row in reader:
                line = reader.line_num
                try:
                    rec = _csv_record(dict(zip(self.header, row)))
                except (ValueError, TypeError, RecursionError) as exc:
                    raise DataError(f"line {line}: not a ctmask predictions row ({exc.__class__.__name__}: "
                                    f"{str(exc)[:120]})", path) from None
                self._add(rec, f"line {line}", path)
        except csv.Error as exc:
            raise DataError(f"not a ctmask predictions file ({exc})", path) from None

    def _add(self, rec: object, where: str, path: Path) -> None:
        problem = _record_problem(rec)
        if problem is not None:
            raise DataError(f"{where}: {problem}: not a ctmask predictions file; --resume refuses it before anything "
                            "runs", path, hint="move the file away (or fix that line) and run again")
        rec.setdefault("key", rec.get("file"))
        slice_id = _slice_id(rec)
        if slice_id in self._first:
            raise DataError(f"{where} repeats the record of {self._first[slice_id]} ({slice_id}): a slice has one "
                            "record; --resume refuses a file that holds one twice before anything runs", path,
                            hint="keep one record per slice (or move the file away) and run again")
        self._first[slice_id] = f"{where} of {path.name}"
        self.records.append(rec)
        if isinstance(rec.get("id"), str):
            self.ids.add(rec["id"])
        else:
            self.keys_without_id.add(str(rec["key"]))

    def check(self, class_names: tuple[str, ...]) -> None:
        """Refuse records another model (other classes) wrote, before anything is written.

        Raises:
            DataError: naming the first record whose classes differ.
        """
        for rec in self.records:
            probs = rec["probs"]
            if set(probs) != set(class_names) or rec["class"] not in class_names:
                raise DataError(f"record of {rec['key']!r} has classes {sorted(probs)} / {rec['class']!r}; this model "
                                f"calls {list(class_names)}: the earlier output is another model's; --resume needs "
                                "the same model", self.path)

    def done(self, ref: SliceRef) -> bool:
        """True when the earlier output holds ``ref``'s record (by identity; by key for records
        without one)."""
        return (bool(ref.identity) and ref.identity in self.ids) or ref.key in self.keys_without_id

    @property
    def keys(self) -> set[str]:
        return {str(r["key"]) for r in self.records}


def _slice_id(rec: object) -> str | None:
    """What a record is matched on: its ``id``, or for an older ctmask's record its key."""
    if not isinstance(rec, dict):
        return None
    if isinstance(rec.get("id"), str):
        return f"id {rec['id']}"
    return f"key {rec.get('key', rec.get('file'))}"


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number a ctmask record holds")


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _rows_of_numbers(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(row, list) and all(_finite(v) for v in row) for row in value)


_TEXT_FIELDS = ("file", "key", "id", "label", "study", "series", "kind", "overlay", "class")


def _record_problem(rec: object) -> str | None:
    """Why ``rec`` is not a slice record ctmask writes (every field it reads checked), or None."""
    if not isinstance(rec, dict):
        return "not a prediction record (an object with file / key, class, probs)"
    if not isinstance(rec.get("key", rec.get("file")), str) or "class" not in rec:
        return "not a prediction record (file / key, class, probs)"
    probs = rec.get("probs")
    if not isinstance(probs, dict) or not probs:
        return "no class probabilities (probs)"
    for name, p in probs.items():
        if not _finite(p) or not 0.0 <= p <= 1.0:
            return f"probability of {name!r} is {p!r}, not a number in [0, 1]"
    for name in _TEXT_FIELDS:
        if rec.get(name) is not None and not isinstance(rec[name], str):
            return f"{name} is {type(rec[name]).__name__}, not text"
    for name in ("position", "top_roi_score"):
        if rec.get(name) is not None and not _finite(rec[name]):
            return f"{name} is {rec[name]!r}, not a finite number"
    for name in ("class_index", "frame", "n_rois"):
        if rec.get(name) is not None and not (isinstance(rec[name], int) and not isinstance(rec[name], bool)):
            return f"{name} is {rec[name]!r}, not a whole number"
    for name in ("top_rois", "top_boxes"):
        if rec.get(name) is not None and not _rows_of_numbers(rec[name]):
            return f"{name} is not rows of finite numbers"
    if rec.get("size") is not None and not (isinstance(rec["size"], list) and all(isinstance(v, int)
                                                                                   for v in rec["size"])):
        return "size is not [H, W]"
    return None


def _csv_record(row: dict) -> dict:
    """A CSV row of :class:`~ctmask.runtime.predict.PredictionWriter` back as a record (types, and
    the text cells :func:`~ctmask.core.spreadsheet.safe_cell` quoted, restored)."""
    row = {k: restore_cell(v) if isinstance(v, str) else v for k, v in row.items()}

    def opt(key: str, cast):
        value = row.get(key)
        return None if value in (None, "") else cast(value)

    rec = {k: v for k, v in row.items() if k and not k.startswith("prob_") and v not in (None, "")}
    rec["probs"] = {k[5:]: float(v) for k, v in row.items() if k and k.startswith("prob_") and v not in ("", None)}
    rec["class_index"] = int(row.get("class_index") or 0)
    for key, cast in (("position", float), ("frame", int), ("n_rois", int), ("top_roi_score", float),
                      ("size", json.loads), ("top_boxes", json.loads)):
        value = opt(key, cast)
        if value is None:
            rec.pop(key, None)
        else:
            rec[key] = value
    return rec
