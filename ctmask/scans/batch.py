"""The one batch loader of ctmask: slices decoded, cropped and resized into a model's input.

:func:`load_batch` decodes slices (:func:`ctmask.scans.decode.read_slice`), crops each to its
body box when the model was trained on cropped slices, resizes it bilinearly to the model's
square input, exactly as training did, and stacks them into a float32 [b, 1, S, S] batch; a
slice that cannot be read (or has no box) becomes a :class:`~ctmask.scans.types.Failure` and
the others go on. ``ctmask infer`` (one batch ahead of the runner, on a worker thread), Ray,
Serve, calibration, parity, bench and evaluation all load through it; :func:`load_slice` is
the same for one file (training's datasets).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ctmask.core.errors import DataError
from ctmask.core.preprocess import LUNG_WINDOW, crop_box, resize
from ctmask.core.spec import GraphSpec
from ctmask.scans.decode import read_slice
from ctmask.scans.hu import DEFAULT_HU_OFFSET
from ctmask.scans.types import DecodedSlice, Failure, SliceRef

Box = tuple[int, int, int, int]
"""A body crop box (xmin, ymin, xmax, ymax), pixels, max exclusive."""


class BoxLookup(Protocol):
    """Where a cropping model's slices find their body boxes (``ctmask.runtime.predict.CropBoxes``)."""

    source: Path

    def lookup(self, path: str | Path) -> Box | None: ...


@dataclass(frozen=True)
class ReadOptions:
    """How slices are read (the ``infer`` flags)."""

    force_modality: bool = False
    hu_offset: float = DEFAULT_HU_OFFSET


@dataclass
class Loaded:
    """One decoded batch: the model input, the slices it holds, and the failures."""

    batch: np.ndarray
    refs: list[SliceRef]
    shapes: list[tuple[int, int]]
    crops: list[Box | None]
    decoded: list[DecodedSlice | None]
    kinds: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        """The files of the slices the batch holds, in its order."""
        return [Path(ref.path) for ref in self.refs]


def model_input(pixels: np.ndarray, box: Box | None, size: int, path: str | Path) -> np.ndarray:
    """A decoded slice as the model sees it: cropped to ``box`` (if any), resized to [size, size].

    Raises:
        DataError: the box is empty on this slice.
    """
    try:
        img = crop_box(pixels, box)
    except ValueError as exc:
        raise DataError(str(exc), path) from None
    return resize(img, size)


def load_slice(path: str | Path, size: int, box: Box | None = None,
               window: tuple[float, float] = LUNG_WINDOW) -> np.ndarray:
    """Read one single-slice file and return the model input: float32 [size, size] in [0, 1].

    Args:
        path: PNG/JPEG/TIFF slice (already lung-windowed grayscale) or DICOM (HU).
        size: model input side (``Preset.image_size``).
        box: optional body crop (xmin, ymin, xmax, ymax) from a COVIDx-CT split file.
        window: (level, width) in HU applied to DICOM input.
    """
    return model_input(read_slice(path, window).pixels, box, size, path)


def _read(ref: SliceRef, spec: GraphSpec, opts: ReadOptions) -> DecodedSlice:
    try:
        return read_slice(ref, spec.window, force_modality=opts.force_modality, hu_offset=opts.hu_offset)
    except DataError:
        raise
    except Exception as exc:  # the readers wrap decoder errors; this is the last line of defence
        raise DataError(f"cannot read ({exc.__class__.__name__}: {exc})", ref.path) from None


def load_batch(slices: Sequence[SliceRef | str | Path], spec: GraphSpec, boxes: BoxLookup | None = None,
               keep_pixels: bool = False, opts: ReadOptions | None = None) -> Loaded:
    """Decode ``slices`` into a float32 [b, 1, S, S] batch; unreadable slices become failures.

    Args:
        slices: the slices (:class:`~ctmask.scans.types.SliceRef`), or paths of single-slice files.
        spec: the model's spec (input size, window, crop).
        boxes: crop boxes, used when ``spec.crop``: a slice without one is a failure (a frame of
            a multi-slice file never has one). ``None`` decodes whole slices whatever the spec
            says (parity checks feed both sides the same tensors; the runtime's ``check_crop``
            refuses it for a cropping model).
        keep_pixels: keep each :class:`~ctmask.scans.types.DecodedSlice` (overlays need its pixels).
        opts: how slices are read (default: :class:`ReadOptions`).
    """
    opts = opts or ReadOptions()
    arrays, ok, shapes, crops, decoded, kinds, failures = [], [], [], [], [], [], []
    for item in slices:
        ref = item if isinstance(item, SliceRef) else SliceRef(str(item))
        box = None
        if spec.crop and boxes is not None:
            box = boxes.lookup(ref.path) if ref.frame is None else None
            if box is None:
                failures.append(Failure(ref.key, f"no crop box for this slice in {boxes.source} (the model was "
                                                 "trained on body-cropped slices)"))
                continue
        try:
            dec = _read(ref, spec, opts)
            arrays.append(model_input(dec.pixels, box, spec.image_size, ref.path))
        except DataError as exc:
            failures.append(Failure.of(ref.key, exc))
            continue
        except MemoryError:
            failures.append(Failure(ref.key, "out of memory decoding this slice"))
            continue
        ok.append(ref)
        shapes.append(tuple(dec.pixels.shape))
        crops.append(box)
        decoded.append(dec if keep_pixels else None)
        kinds.append(dec.kind)
    s = spec.image_size
    batch = np.stack(arrays)[:, None] if arrays else np.zeros((0, 1, s, s), np.float32)
    return Loaded(batch.astype(np.float32, copy=False), ok, shapes, crops, decoded, kinds, failures)
