"""Pre-processing maths, shared by training, export checks and runtime.

Pipeline: decode file -> grayscale float32 in [0, 1] -> optional crop to a body box ->
bilinear resize to the model's square input. Decoding lives in :mod:`ctmask.scans` (shared
with ``ctmask infer``; :func:`ctmask.scans.batch.load_batch` runs the whole pipeline): 8-bit
images are taken as already windowed; DICOM slices are converted to Hounsfield units
(modality LUT: RescaleSlope / RescaleIntercept), 16-bit images from HU + 1024, and rendered
with the lung window (:func:`window_hu`), as the synthetic data and COVIDx-CT slices are.
Channel replication and ImageNet normalisation are *not* done here: they live inside
the model (and its exported graph).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ctmask.core.errors import DataError, TooLargeError

LUNG_WINDOW: tuple[float, float] = (-600.0, 1500.0)
"""Lung window (level, width) in Hounsfield units: maps [-1350, 150] HU to [0, 1]."""

RESIZE_METHODS = ("bilinear",)
"""Resize methods :func:`resize` implements (recorded per model, checked at run time)."""

MIN_IMAGE_SIDE = 32
"""Smallest slice side (pixels) the readers accept (:func:`check_image_size`): a smaller image
carries too little to classify, and resizing it up would only invent pixels."""

MAX_IMAGE_SIDE = 8192
"""Largest slice side (pixels) the readers accept, checked on the size a file declares
*before* its pixels are decoded (a 65-byte PNG can declare 20000 x 20000)."""


def window_hu(hu: np.ndarray, level: float = LUNG_WINDOW[0], width: float = LUNG_WINDOW[1]) -> np.ndarray:
    """Map Hounsfield units to [0, 1] with a CT window.

    Args:
        hu: array of HU values, any shape.
        level: window centre in HU.
        width: window width in HU.

    Returns:
        float32 array of the same shape, clipped to [0, 1].
    """
    lo = level - width / 2.0
    out = (np.asarray(hu, dtype=np.float32) - lo) / float(width)
    return np.clip(out, 0.0, 1.0, out=out)


def check_image_size(width: int, height: int, path: str | Path) -> None:
    """Refuse a slice whose sides are outside [:data:`MIN_IMAGE_SIDE`, :data:`MAX_IMAGE_SIDE`].

    Raises:
        DataError: naming ``path``, the size found and the accepted range
            (:class:`~ctmask.core.errors.TooLargeError` for a side past the maximum).
    """
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
        raise TooLargeError(f"image declares {width}x{height} pixels, more than the maximum of "
                            f"{MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} (refused before decoding)", path)
    if width < MIN_IMAGE_SIDE or height < MIN_IMAGE_SIDE:
        raise DataError(f"image is {width}x{height} pixels, less than the minimum of "
                        f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}", path)


def crop_box(img: np.ndarray, box: tuple[int, int, int, int] | None) -> np.ndarray:
    """Crop ``img`` [H, W] to ``box`` = (xmin, ymin, xmax, ymax), pixels, xmax exclusive.

    The box is clipped to the image; an empty result raises :class:`ValueError`.
    """
    if box is None:
        return img
    h, w = img.shape
    x0, y0, x1, y1 = (int(v) for v in box)
    x0, y0 = max(0, x0), max(0, y0)
    x1, y1 = min(w, x1), min(h, y1)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"crop box {box} is empty for an image of size {w}x{h}")
    return img[y0:y1, x0:x1]


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a float32 [H, W] image to [size, size] (no-op if already so)."""
    if img.shape == (size, size):
        return np.ascontiguousarray(img, dtype=np.float32)
    pil = Image.fromarray(np.asarray(img, dtype=np.float32), mode="F")
    return np.array(pil.resize((size, size), Image.BILINEAR), dtype=np.float32)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of an integer label mask [H, W] to [size, size]."""
    if mask.shape == (size, size):
        return mask
    pil = Image.fromarray(mask.astype(np.uint8), mode="L")
    return np.asarray(pil.resize((size, size), Image.NEAREST), dtype=mask.dtype)


@dataclass(frozen=True)
class Preprocessing:
    """Every pre-processing choice a model was trained with; the runtime repeats them.

    Stored in the checkpoint config (``preprocess``) and in the exported graph's metadata
    (``ctmask.preprocess``, ``ctmask.window``), so a served model sees the slices it was
    trained on.

    Attributes:
        crop: slices were cropped to their per-slice body box (COVIDx-CT split file,
            ``train-cls --crop``) before resizing; the runtime then needs those boxes.
        resize: resize method to the square input (one of :data:`RESIZE_METHODS`).
        window: (level, width) in HU that renders DICOM input to [0, 1].
    """

    crop: bool = False
    resize: str = "bilinear"
    window: tuple[float, float] = LUNG_WINDOW

    def to_dict(self) -> dict:
        return {"crop": self.crop, "resize": self.resize, "window": {"level": self.window[0], "width": self.window[1]}}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """Inverse of :meth:`to_dict`; missing keys take the defaults (what older files meant).

        Raises:
            ValueError: a value has the wrong type or the resize method is unknown.
        """
        crop = d.get("crop", False)
        if not isinstance(crop, bool):
            raise ValueError(f"preprocess.crop must be true or false, got {crop!r}")
        resize = d.get("resize", "bilinear")
        if resize not in RESIZE_METHODS:
            raise ValueError(f"unsupported resize method {resize!r}; this ctmask implements "
                             f"{', '.join(RESIZE_METHODS)}")
        w = d.get("window", {"level": LUNG_WINDOW[0], "width": LUNG_WINDOW[1]})
        return cls(crop=crop, resize=resize, window=(float(w["level"]), float(w["width"])))
