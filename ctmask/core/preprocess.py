"""Image decoding and pre-processing, shared by training, export checks and runtime.

Pipeline: decode file -> grayscale float32 in [0, 1] -> optional crop to a body box ->
bilinear resize to the model's square input. Decoding lives in :mod:`ctmask.core.readers`
(shared with ``ctmask infer``): 8-bit images are taken as already windowed; DICOM slices are
converted to Hounsfield units (modality LUT: RescaleSlope / RescaleIntercept), 16-bit images
from HU + 1024, and rendered with the lung window, as the synthetic data and COVIDx-CT
slices are.
Channel replication and ImageNet normalisation are *not* done here: they live inside
the model (and its exported graph).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ctmask.core.errors import DataError

LUNG_WINDOW: tuple[float, float] = (-600.0, 1500.0)
"""Lung window (level, width) in Hounsfield units: maps [-1350, 150] HU to [0, 1]."""

RESIZE_METHODS = ("bilinear",)
"""Resize methods :func:`load_slice` implements (recorded per model, checked at run time)."""

MIN_IMAGE_SIDE = 32
"""Smallest slice side (pixels) :func:`read_gray` accepts: a smaller image carries too little
to classify, and resizing it up would only invent pixels."""

MAX_IMAGE_SIDE = 8192
"""Largest slice side (pixels) :func:`read_gray` accepts, checked on the size a file declares
*before* its pixels are decoded (a 65-byte PNG can declare 20000 x 20000)."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom")
DICOM_SUFFIXES = (".dcm", ".dicom")


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


def is_dicom(path: Path) -> bool:
    """True for a DICOM suffix or a file with the ``DICM`` marker after its preamble."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with open(path, "rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def check_image_size(width: int, height: int, path: str | Path) -> None:
    """Refuse a slice whose sides are outside [:data:`MIN_IMAGE_SIDE`, :data:`MAX_IMAGE_SIDE`].

    Raises:
        DataError: naming ``path``, the size found and the accepted range.
    """
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
        raise DataError(f"image declares {width}x{height} pixels, more than the maximum of "
                        f"{MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} (refused before decoding)", path)
    if width < MIN_IMAGE_SIDE or height < MIN_IMAGE_SIDE:
        raise DataError(f"image is {width}x{height} pixels, less than the minimum of "
                        f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}", path)


def read_dicom_hu(path: str | Path) -> np.ndarray:
    """Read a single-frame DICOM slice as float32 [H, W] Hounsfield units.

    The modality LUT (RescaleSlope / RescaleIntercept) is applied and PixelPaddingValue
    pixels are set to air, as :func:`ctmask.core.readers.read_slice` does.

    Raises:
        DataError: naming the file, when it is not a readable single-frame DICOM image in HU
            (no pixel data, several frames, compressed without a decoder, a rendered image),
            declares a size outside [:data:`MIN_IMAGE_SIDE`, :data:`MAX_IMAGE_SIDE`] (checked
            before the pixels are decoded), or has a non-numeric or non-finite rescale slope /
            intercept or non-finite Hounsfield units.
    """
    from ctmask.core.readers import read_dicom_hu as read

    return read(path)


def read_gray(path: str | Path, window: tuple[float, float] = LUNG_WINDOW) -> np.ndarray:
    """Decode a single-slice file to a float32 [H, W] array in [0, 1].

    Training and inference share this decoding (:func:`ctmask.core.readers.read_single`; the
    rules per file type are in :mod:`ctmask.core.readers`): 8-bit images are taken as already
    windowed (value / 255, colour as luminance); 16-bit images hold HU + 1024 and 32-bit
    integer or float images HU (float within [0, 1]: already windowed), rendered with
    ``window`` (level, width) as DICOM (HU through the modality LUT) is.

    Every decoding failure is a :class:`DataError` naming the file (the per-file failure
    the runtime reports and skips): missing, unreadable, truncated or not an image; a
    declared size outside [:data:`MIN_IMAGE_SIDE`, :data:`MAX_IMAGE_SIDE`] pixels per side
    (checked before the pixels are decoded); non-finite pixels or DICOM rescale values; a
    multi-frame DICOM or a NIfTI volume (``ctmask infer`` predicts each of their slices).
    """
    from ctmask.core.readers import read_single

    return read_single(path, window)


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


def load_slice(
    path: str | Path,
    size: int,
    box: tuple[int, int, int, int] | None = None,
    window: tuple[float, float] = LUNG_WINDOW,
) -> np.ndarray:
    """Read one slice and return the model input: float32 [size, size] in [0, 1].

    The one pre-processing path of ctmask: training, export checks and the runtime all
    call it, so they all see identical tensors.

    Args:
        path: PNG/JPEG/TIFF slice (already lung-windowed grayscale) or DICOM (HU).
        size: model input side (``Preset.image_size``).
        box: optional body crop (xmin, ymin, xmax, ymax) from a COVIDx-CT split file.
        window: (level, width) in HU applied to DICOM input.
    """
    img = read_gray(path, window)
    try:
        img = crop_box(img, box)
    except ValueError as exc:
        raise DataError(str(exc), path) from None
    return resize(img, size)


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
