"""Raster images (PNG, JPEG, TIFF, BMP) read with Pillow: 8-bit ones as already windowed, 16-bit
and 32-bit integer ones and float ones as CT values (the rules: :mod:`ctmask.scans.decode`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ctmask.core.errors import DataError, TooLargeError
from ctmask.core.preprocess import MAX_IMAGE_SIDE, check_image_size
from ctmask.scans.capture import captured, error_text
from ctmask.scans.hu import render_hu
from ctmask.scans.sniff import RASTER_FORMATS


def read_raster(path: Path, frame: int | None, window: tuple[float, float],
                hu_offset: float) -> tuple[np.ndarray, str, dict]:
    """Decode a raster image file (its only frame) as the rules of :mod:`ctmask.scans.decode` say:
    (pixels in [0, 1], kind, info).

    Raises:
        DataError: naming the file; :class:`~ctmask.core.errors.TooLargeError` when it declares more
            pixels than Pillow's decompression-bomb limit.
    """
    if frame not in (None, 0):
        raise DataError(f"an image file holds one slice; frame {frame} was asked for", path)
    notes: list[str] = []
    try:
        with captured(notes), Image.open(path, formats=RASTER_FORMATS) as im:
            check_image_size(*im.size, path)
            pages = int(getattr(im, "n_frames", 1) or 1)
            if pages > 1:
                raise DataError(f"image holds {pages} pages (frames); ctmask reads single-page images: save each "
                                "slice as its own file", path)
            info: dict[str, Any] = {"format": im.format, "mode": im.mode}
            im.load()
            pixels, kind, assumed = _raster_pixels(im, window, hu_offset, path)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TooLargeError(f"image declares too many pixels ({exc}); the maximum is "
                            f"{MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}, refused before decoding", path) from None
    except Exception as exc:  # a decoder of untrusted bytes: any failure is this file's
        raise DataError(error_text("cannot decode image", exc), path) from None
    info["assumed"] = assumed
    if notes:
        info["warnings"] = notes
    return pixels, kind, info


def _raster_pixels(im: Image.Image, window: tuple[float, float], hu_offset: float,
                   path: Path) -> tuple[np.ndarray, str, str]:
    """(pixels in [0, 1], kind, what was assumed) of a decoded Pillow image."""
    mode = im.mode
    off = f"{hu_offset:g}"
    if mode.startswith("I;16"):
        if mode not in ("I;16", "I;16L", "I;16B", "I;16N"):
            raise DataError(f"unsupported 16-bit image mode {mode}", path)
        hu = np.asarray(im).astype(np.float64) - hu_offset
        return render_hu(hu, window), f"image-16bit-hu+{off}", f"16-bit values are HU + {off}"
    if mode == "I":
        arr = np.asarray(im).astype(np.float64)
        if (arr < 0).any():
            return render_hu(arr, window), "image-int-hu", "integers with negative values are HU"
        return (render_hu(arr - hu_offset, window), f"image-int-hu+{off}",
                f"integers without a negative value are HU + {off}")
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise DataError("image holds pixels that are not finite numbers (NaN or infinity)", path)
        if arr.min() >= 0.0 and arr.max() <= 1.0:
            return arr.copy(), "image-float-unit", "float values within [0, 1] are already windowed"
        return render_hu(arr, window), "image-float-hu", "float values outside [0, 1] are HU"
    if mode in ("1", "L", "LA", "La"):
        gray = im.convert("L")
    else:  # RGB(A), palette, CMYK, YCbCr...: luminance, alpha dropped
        gray = im.convert("RGB").convert("L")
    assumed = "8-bit values are already windowed: value / 255"
    if mode not in ("1", "L"):
        assumed += f" (luminance of {mode}, alpha ignored)"
    return np.asarray(gray, dtype=np.float32) / np.float32(255.0), "image-8bit", assumed
