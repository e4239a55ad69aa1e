"""Calibration slice sets: chosen from a folder, a split file or a synth folder, balanced
across classes where labels are known, decoded exactly as inference decodes them.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctmask.core.errors import DataError
from ctmask.core.spec import GraphSpec
from ctmask.data.covidx import read_split
from ctmask.runtime.predict import CropBoxes, collect_images
from ctmask.scans.batch import load_batch
from ctmask.scans.types import Failure

SPLIT_FOR_CALIBRATION = "train_COVIDx_CT.txt"
"""In a ``ctmask synth`` folder, calibration takes the training split (never test slices)."""


@dataclass(frozen=True)
class CalibrationSlice:
    """One calibration slice: its file, its class (None when unknown) and its content hash."""

    path: Path
    label: int | None
    sha256: str

    def to_dict(self) -> dict:
        return {"file": str(self.path.resolve()), "label": self.label, "sha256": self.sha256}


@dataclass
class CalibrationSet:
    """Decoded calibration slices.

    Attributes:
        source: what the slices were chosen from (folder, split file).
        slices: the chosen slices, in the order of ``images``.
        images: float32 [M, 1, S, S] in [0, 1], decoded with the graph's pre-processing.
        skipped: slices that could not be read (file and reason).
    """

    source: Path
    slices: list[CalibrationSlice]
    images: np.ndarray
    skipped: list[Failure]

    def class_counts(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for s in self.slices:
            out["unlabelled" if s.label is None else str(s.label)] += 1
        return dict(out)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def balanced_sample(labels: list[int | None], size: int, seed: int) -> list[int]:
    """Indices of ``size`` items drawn round-robin over the classes (shuffled per class).

    Unlabelled items form one group. A class with fewer items than its share gives its
    turn to the others, so the result has ``min(size, len(labels))`` items. The order
    within the result follows the input order (deterministic for a seed).
    """
    rng = np.random.default_rng(seed)
    groups: dict[object, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        groups[label].append(i)
    queues = [list(rng.permutation(groups[k])) for k in sorted(groups, key=lambda k: (k is None, k))]
    chosen: list[int] = []
    while len(chosen) < min(size, len(labels)):
        for q in queues:
            if q and len(chosen) < size:
                chosen.append(int(q.pop(0)))
    return sorted(chosen)


def _candidates(source: Path) -> tuple[list[Path], list[int | None], CropBoxes | None, list[Failure]]:
    """Files, labels and crop boxes from a folder, a split file or a synth folder."""
    split = source / SPLIT_FOR_CALIBRATION if source.is_dir() else source
    if source.is_dir() and not split.is_file():
        files, failures = collect_images([source])
        if not files:
            why = "; ".join(f"{f.file}: {f.reason}" for f in failures[:3])
            raise DataError("no calibration slices: the folder holds no images"
                            + (f" ({why})" if why else ""), source,
                            hint="pass a folder of slices (PNG, JPEG, TIFF, DICOM), a COVIDx-CT split file or a "
                                 "`ctmask synth` folder")
        return files, [None] * len(files), None, failures
    if not source.exists():
        raise DataError("calibration source does not exist", source)
    entries = read_split(split, check_exists=False)
    boxes = CropBoxes.from_split(split)
    return [e.path for e in entries], [e.label for e in entries], boxes, []


def calibration_set(source: str | Path, spec: GraphSpec, size: int = 64, seed: int = 0) -> CalibrationSet:
    """Choose and decode up to ``size`` calibration slices for the graph described by ``spec``.

    Args:
        source: a folder of slices, a COVIDx-CT split file (labels and crop boxes), or a
            ``ctmask synth`` folder (its training split).
        spec: the graph's spec: input size, DICOM window and body crop, as inference uses.
        size: slices wanted; drawn class-balanced when labels exist.
        seed: the draw's seed.

    Raises:
        DataError: the source does not exist, holds no slices, or none could be read.
    """
    if size < 1:
        raise DataError(f"calibration needs at least 1 slice, asked for {size}", source)
    source = Path(source)
    files, labels, boxes, failures = _candidates(source)
    if spec.crop and boxes is None:
        raise DataError("the model was trained on body-cropped slices, so its calibration slices need crop boxes",
                        source, hint="calibrate from a COVIDx-CT split file (or a `ctmask synth` folder)")
    picked = balanced_sample(labels, size, seed)
    chosen = [files[i] for i in picked]
    label_of = {files[i]: labels[i] for i in picked}
    loaded = load_batch(chosen, spec, boxes if spec.crop else None)
    images, ok, bad = loaded.batch, loaded.paths, loaded.failures
    failures += bad
    if not ok:
        reasons = "; ".join(f"{f.file}: {f.reason}" for f in failures[:5])
        raise DataError(f"none of the {len(chosen)} calibration slices could be read ({reasons})", source)
    slices = [CalibrationSlice(p, label_of[p], file_sha256(p)) for p in ok]
    return CalibrationSet(source, slices, images, failures)
