"""Reader of the CNCB lesion-segmentation layout.

Layout::

    ROOT/images/NAME.png   slice (lung-windowed grayscale)
    ROOT/masks/NAME.png    mask of the same size, uint8 values
                           0 background, 1 lung field, 2 GGO, 3 consolidation

The lung field is merged into background; lesion instances are 8-connected components of
one lesion class with more than ``min_pixels`` (100) pixels, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from ctmask.core.errors import DataError
from ctmask.scans.sniff import IMAGE_SUFFIXES

MASK_VALUES: tuple[int, ...] = (0, 1, 2, 3)
"""Valid raw mask values: background, lung field, GGO, consolidation."""

MIN_INSTANCE_PIXELS = 100
"""An instance must have more than this many pixels (smaller specks are label noise)."""

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class SegSample:
    """One slice of the segmentation set: image file and its mask file (same stem)."""

    image: Path
    mask: Path


def list_segmentation(root: str | Path) -> list[SegSample]:
    """List ``root/images/*`` with their ``root/masks/<stem>.png``, sorted by file name.

    Raises:
        DataError: ``root``, ``images/`` or ``masks/`` is missing, the set is empty, or an
            image has no mask (the error names the image and the expected mask path).
    """
    root = Path(root)
    images_dir, masks_dir = root / "images", root / "masks"
    for folder in (root, images_dir, masks_dir):
        if not folder.is_dir():
            raise DataError("segmentation folder does not exist", folder,
                            hint="expected ROOT/images/NAME.png and ROOT/masks/NAME.png")
    masks = {p.stem: p for p in masks_dir.iterdir() if p.suffix.lower() == ".png"}
    samples = []
    for img in sorted(images_dir.iterdir(), key=lambda p: p.name):
        if img.name.startswith(".") or img.suffix.lower() not in IMAGE_SUFFIXES:
            continue  # skips temporary files of interrupted atomic writes, too
        mask = masks.get(img.stem)
        if mask is None:
            raise DataError(f"image has no mask (expected {masks_dir / (img.stem + '.png')})", img)
        samples.append(SegSample(image=img, mask=mask))
    if not samples:
        raise DataError("segmentation folder holds no images", images_dir)
    return samples


def read_mask(path: str | Path, expected_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Decode and validate a mask PNG.

    Args:
        path: 8-bit single-channel PNG with values in {0, 1, 2, 3}.
        expected_shape: (H, W) of the matching image, if it should be checked.

    Returns:
        uint8 [H, W] with the raw values 0..3 (lung field not yet merged).

    Raises:
        DataError: the file is missing or undecodable, not single-channel integer, holds a
            value outside {0, 1, 2, 3} (all unexpected values are listed), or its shape
            differs from ``expected_shape``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("mask file does not exist", path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                raise DataError(f"mask must be a single-channel integer image, found mode {im.mode}", path)
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot decode mask ({exc.__class__.__name__}: {exc})", path) from None
    if arr.ndim != 2:
        raise DataError(f"expected a 2-D mask, found shape {arr.shape}", path)
    bad = np.setdiff1d(np.unique(arr), MASK_VALUES)
    if bad.size:
        raise DataError(
            f"mask holds unexpected values {bad.tolist()}; expected only {list(MASK_VALUES)} "
            "(0 background, 1 lung, 2 GGO, 3 consolidation)",
            path,
        )
    if expected_shape is not None and tuple(arr.shape) != tuple(expected_shape):
        raise DataError(
            f"mask shape {tuple(arr.shape)} differs from image shape {tuple(expected_shape)}", path
        )
    return arr.astype(np.uint8)


def lesion_label_map(mask: np.ndarray) -> np.ndarray:
    """Map raw mask values to detector classes.

    Args:
        mask: integer [H, W], values 0..3.

    Returns:
        uint8 [H, W]: 0 background (incl. lung field), 1 GGO, 2 consolidation.
    """
    lut = np.array([0, 0, 1, 2], dtype=np.uint8)
    return lut[np.asarray(mask, dtype=np.intp)]


def mask_to_instances(
    mask: np.ndarray, min_pixels: int = MIN_INSTANCE_PIXELS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split a raw mask into lesion instances (8-connected components per class).

    Args:
        mask: integer [H, W] with raw values 0..3.
        min_pixels: a component needs strictly more pixels than this.

    Returns:
        boxes: float32 [K, 4] (x1, y1, x2, y2) pixels, x2/y2 exclusive (max index + 1).
        labels: int64 [K], 1 GGO or 2 consolidation.
        masks: uint8 [K, H, W] binary instance masks.
        Order: GGO before consolidation, then by component index (raster order of the
        component's first pixel), so it is deterministic.
    """
    classes = lesion_label_map(mask)
    h, w = classes.shape
    boxes, labels, masks = [], [], []
    for cls in (1, 2):
        comp, n = ndimage.label(classes == cls, structure=_EIGHT_CONNECTED)
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel(), minlength=n + 1)
        slices = ndimage.find_objects(comp)
        for idx in range(1, n + 1):
            if sizes[idx] <= min_pixels:
                continue
            sy, sx = slices[idx - 1]
            boxes.append((sx.start, sy.start, sx.stop, sy.stop))
            labels.append(cls)
            masks.append(comp == idx)
    if not boxes:
        return (np.zeros((0, 4), np.float32), np.zeros((0,), np.int64), np.zeros((0, h, w), np.uint8))
    return (
        np.asarray(boxes, dtype=np.float32),
        np.asarray(labels, dtype=np.int64),
        np.stack(masks).astype(np.uint8),
    )
