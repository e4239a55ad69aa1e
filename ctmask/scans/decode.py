"""Decoding one slice: the one decode entry point of ctmask, :func:`read_slice`.

A slice (a :class:`~ctmask.scans.types.SliceRef` from :func:`ctmask.scans.listing.collect_sources`,
or the path of a single-slice file) becomes a :class:`~ctmask.scans.types.DecodedSlice`: float32
[H, W] in [0, 1], in the file's own pixel frame (no resize). ``ctmask infer``, training, export
checks, calibration and ``ctmask serve`` all decode through it (the model input is made from it
by :mod:`ctmask.scans.batch`). The file's type is told by :func:`ctmask.scans.sniff.sniff`.

Rules, fixed per file type and never scaled by a slice's own content:

* **DICOM** (``dicom-hu``, ``dicom-rendered``): :mod:`ctmask.scans.dicom`.
* **NIfTI** (``nifti-hu``): :mod:`ctmask.scans.nifti`.
* **8-bit images** (``image-8bit``): already windowed, value / 255; colour -> luminance
  (ITU-R 601), palette images through their palette, alpha ignored (not composited).
* **16-bit unsigned images** (``image-16bit-hu+1024``; PNG / TIFF mode ``I;16*``): CT values
  stored as HU + ``hu_offset`` (1024, the common convention): HU = value - 1024, then the window.
* **32-bit integer images** (mode ``I``, e.g. int32 TIFF): with any negative pixel, HU as
  stored (``image-int-hu``); with none, HU + ``hu_offset`` as for 16 bits
  (``image-int-hu+1024``). A chest slice in HU always holds air (< 0), a slice in HU + 1024
  never does: the rule reads the sign, never the scale.
* **float images** (mode ``F``): all values within [0, 1]: already windowed
  (``image-float-unit``); otherwise HU (``image-float-hu``). Non-finite values are refused.

  A 16-bit image holding a rendering (a window stretched to 0..65535) is read wrongly by this
  rule: save renderings as 8 bits.

Sizes are checked on what a file declares, before its pixels are decoded
(:func:`ctmask.core.preprocess.check_image_size`: 32..8192 px per side; Pillow's
decompression-bomb warning and error become :class:`~ctmask.core.errors.TooLargeError` too).
Every limit is in :mod:`ctmask.core.limits` (one table), checked before the memory is spent
(:mod:`ctmask.scans.bounded`). Every problem with a file is a
:class:`~ctmask.core.errors.DataError`. Warnings the decoders emit (pydicom, nibabel, Pillow:
``warnings`` and their loggers) are not printed: they are kept in ``DecodedSlice.info["warnings"]``
(:mod:`ctmask.scans.capture`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctmask.core.errors import DataError, UnsupportedFileError
from ctmask.core.preprocess import LUNG_WINDOW
from ctmask.scans.capture import error_text
from ctmask.scans.dicom import is_dicom_image, read_dicom
from ctmask.scans.hu import DEFAULT_HU_OFFSET
from ctmask.scans.nifti import read_nifti
from ctmask.scans.raster import read_raster
from ctmask.scans.sniff import NOT_AN_IMAGE, is_raster, sniff
from ctmask.scans.types import DecodedSlice, SliceRef


def read_slice(ref: SliceRef | str | Path, window: tuple[float, float] = LUNG_WINDOW, force_modality: bool = False,
               hu_offset: float = DEFAULT_HU_OFFSET) -> DecodedSlice:
    """Decode one slice to float32 [H, W] in [0, 1] in the file's pixel frame (rules: module doc).

    Args:
        ref: the slice (from :func:`~ctmask.scans.listing.collect_sources`), or the path of a
            single-slice file (an image, a single-frame DICOM).
        window: (level, width) in HU for inputs in HU.
        force_modality: decode DICOM of modalities other than CT.
        hu_offset: what 16-bit (and non-negative 32-bit) integer images add to HU.

    Raises:
        DataError: naming the file, for any problem with it (never another exception); for a
            path, also for a multi-frame DICOM or a NIfTI volume (``ctmask infer`` predicts each
            of their slices).
    """
    if not isinstance(ref, SliceRef):
        ref = SliceRef(str(ref))
    pixels, kind, info = _decode(Path(ref.path), ref.frame, window, force_modality, hu_offset)
    return DecodedSlice(ref=ref, pixels=pixels, kind=kind, info=info)


def _decode(path: Path, frame: int | None, window: tuple[float, float], force_modality: bool,
            hu_offset: float) -> tuple[np.ndarray, str, dict]:
    try:
        try:
            if not path.is_file():  # a named pipe would block the read
                raise DataError("image file does not exist" if not path.exists() else
                                "is a folder, not an image file" if path.is_dir() else "not a regular file", path)
            kind = sniff(path)
        except OSError as exc:
            raise DataError(error_text("cannot read file", exc), path) from None
        if kind == "nifti":
            pixels, name, info = read_nifti(path, frame, window)
        elif kind == "image":
            pixels, name, info = read_raster(path, frame, window, hu_offset)
        elif kind == "dicom":
            pixels, name, info = read_dicom(path, frame, window, force_modality)
        else:
            pixels, name, info = _read_unknown(path, frame, window, force_modality, hu_offset)
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        if pixels.ndim != 2 or pixels.size == 0:
            raise DataError(f"expected a 2-D slice, found shape {pixels.shape}", path)
        if not np.isfinite(pixels).all():
            raise DataError("image holds pixels that are not finite numbers (NaN or infinity)", path)
        return np.clip(pixels, 0.0, 1.0, out=pixels), name, info
    except DataError:
        raise
    except Exception as exc:  # a decoder of untrusted bytes: any failure is this file's
        raise DataError(error_text("cannot decode", exc), path) from None


def _read_unknown(path: Path, frame: int | None, window: tuple[float, float], force_modality: bool,
                  hu_offset: float) -> tuple[np.ndarray, str, dict]:
    """A file without a known suffix or marker: a DICOM image pydicom can read, else a raster image."""
    if is_dicom_image(path):
        return read_dicom(path, frame, window, force_modality)
    if is_raster(path):
        return read_raster(path, frame, window, hu_offset)
    raise UnsupportedFileError("cannot decode image: " + NOT_AN_IMAGE, path)
