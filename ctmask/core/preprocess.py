"""Image decoding and pre-processing, shared by training, export checks and runtime.

Pipeline: decode file -> grayscale float32 in [0, 1] -> optional crop to a body box ->
bilinear resize to the model's square input. Rendered slices (PNG, JPEG, TIFF) are taken
as already windowed; DICOM slices are converted to Hounsfield units (modality LUT:
RescaleSlope / RescaleIntercept) and rendered with the lung window, as the synthetic data
and COVIDx-CT slices are.
Channel replication and ImageNet normalisation are *not* done here: they live inside
the model (and its exported graph).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ctmask.core.errors import DataError

LUNG_WINDOW: tuple[float, float] = (-600.0, 1500.0)
"""Lung window (level, width) in Hounsfield units: maps [-1350, 150] HU to [0, 1]."""

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


def read_dicom_hu(path: str | Path) -> np.ndarray:
    """Read a single-frame CT DICOM slice as float32 [H, W] Hounsfield units.

    Raises :class:`DataError` naming the file when it is not a readable single-frame
    DICOM image (no pixel data, several frames, compressed without a decoder).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
    except (InvalidDicomError, AttributeError, ValueError, RuntimeError, OSError, EOFError) as exc:
        raise DataError(f"cannot decode DICOM ({exc.__class__.__name__}: {exc})", path) from None
    if arr.ndim != 2:
        raise DataError(f"expected a single-frame 2-D slice, found pixel array of shape {arr.shape}", path)
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    return arr.astype(np.float32) * slope + intercept


def read_gray(path: str | Path, window: tuple[float, float] = LUNG_WINDOW) -> np.ndarray:
    """Decode a slice to a float32 [H, W] array in [0, 1].

    8- and 16-bit images are scaled by their type's range; colour images are converted to
    luminance; DICOM is converted to HU and rendered with ``window`` (level, width). Raises
    :class:`DataError` naming the file when it is missing, truncated or not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("image file does not exist", path)
    if is_dicom(path):
        return window_hu(read_dicom_hu(path), *window)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32)
                scale = 65535.0 if arr.max() > 255 else 255.0
                return np.clip(arr / scale, 0.0, 1.0)
            arr = np.asarray(im.convert("L"), dtype=np.float32)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot decode image ({exc.__class__.__name__}: {exc})", path) from None
    if arr.ndim != 2 or arr.size == 0:
        raise DataError(f"expected a 2-D image, found shape {arr.shape}", path)
    return arr / 255.0


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
