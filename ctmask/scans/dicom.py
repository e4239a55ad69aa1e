"""DICOM files read with pydicom: what a file holds (headers, geometry), and one slice's pixels.

* **DICOM** (``dicom-hu``): HU = stored * RescaleSlope + RescaleIntercept (the Modality LUT
  Sequence where present; for enhanced multi-frame CT the Pixel Value Transformation of the
  frame's functional groups, per-frame first, then shared), then the window. Pixels equal to
  PixelPaddingValue (or within PixelPaddingValue..PixelPaddingRangeLimit) are set to air
  (-1000 HU) first. MONOCHROME1 does not change HU (it only tells a viewer to invert its
  display; the window renders air dark as in training). Modalities other than CT are refused
  unless forced.
* **DICOM without rescale** (``dicom-rendered``): an image with no RescaleSlope /
  RescaleIntercept / Modality LUT and at most 8 bits stored, or a colour image (secondary
  capture, screenshots), holds a rendering, not HU: value / (2**BitsStored - 1) (colour:
  luminance), inverted for MONOCHROME1. Any modality (a secondary capture often keeps
  ``CT``); a 16-bit image without rescale tags is HU with the identity rescale (the DICOM default).

:func:`probe_dicom` reads a file's headers only (its slices, their series, study and geometry);
:func:`read_dicom` decodes one slice or frame. Every file is first checked on its raw bytes
(:func:`~ctmask.scans.bounded.check_dicom_limits`: a Deflated file inflated in a stream and
counted, sequence items counted) before pydicom reads it, and a compressed frame on its own
headers before a decoder allocates it. pydicom is imported when a DICOM file is read.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ctmask.core.errors import DataError
from ctmask.core.limits import MAX_SLICES
from ctmask.core.preprocess import check_image_size
from ctmask.scans.bounded import check_compressed_frame, check_dicom_limits
from ctmask.scans.capture import captured, error_text, file_key
from ctmask.scans.hu import AIR_HU, render_hu
from ctmask.scans.types import DicomSlice, FileProbe

CT = "CT"
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
_HEADER_TAGS = ["SOPClassUID", "SOPInstanceUID", "Modality", "ImageType", "StudyInstanceUID", "SeriesInstanceUID",
                "ImagePositionPatient", "ImageOrientationPatient", "InstanceNumber", "NumberOfFrames", "Rows",
                "Columns", "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "SpecificCharacterSet",
                "Manufacturer"]
SECONDARY_CAPTURE_CLASS = "1.2.840.10008.5.1.4.1.1.7"
RESULT_MANUFACTURER = "ctmask"
"""The Manufacturer of the objects ``infer --dicom-out`` writes (its Secondary Captures are
images of the study, but results, not slices: an export of the study holds them)."""

_LOCAL = threading.local()  # .dataset: the multi-frame data set the thread read last (its next frames)


# ---------------------------------------------------------------- DICOM headers


def _pydicom():
    import pydicom

    return pydicom


def _int(ds: Any, keyword: str, default: int | None = None) -> int | None:
    value = ds.get(keyword, None)
    if value is None or value == "":
        return default
    return int(value)


def _floats(value: Any, n: int) -> np.ndarray | None:
    """``value`` as ``n`` finite floats, or None."""
    if value is None:
        return None
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.isfinite(out).all() else None


def _group_item(ds: Any, frame: int | None, keyword: str, path: Path) -> Any:
    """First item of functional group ``keyword`` for ``frame`` (per-frame, then shared), or None.

    Raises:
        DataError: a functional group that is not a sequence of items (pydicom keeps a sequence
            stored as VR UN of 64 KiB or more as bytes).
    """
    from pydicom.dataset import Dataset

    places = []
    per_frame = _items(ds, "PerFrameFunctionalGroupsSequence", path)
    if per_frame is not None and frame is not None and frame < len(per_frame):
        places.append(("PerFrameFunctionalGroupsSequence", per_frame[frame]))
    shared = _items(ds, "SharedFunctionalGroupsSequence", path)
    if shared:
        places.append(("SharedFunctionalGroupsSequence", shared[0]))
    for name, group in places:
        if not isinstance(group, Dataset):
            _items(ds, name, path, group)
        seq = _items(group, keyword, path)
        if seq:
            if not isinstance(seq[0], Dataset):
                _items(group, keyword, path, seq[0])
            return seq[0]
    return None


def _items(ds: Any, keyword: str, path: Path, found: Any = None) -> Any:
    """``ds``'s sequence ``keyword`` (None when absent), refused when it is no sequence (or ``found``,
    one of its items, is no data set)."""
    from pydicom.sequence import Sequence

    value = ds.get(keyword, None)
    if found is None and (value is None or isinstance(value, Sequence)):
        return value
    value = value if found is None else found
    vr = ds[keyword].VR if keyword in ds else "?"
    raise DataError(f"its {keyword} is not a sequence of items but {type(value).__name__} of VR {vr}"
                    + (f" ({len(value):,} bytes)" if isinstance(value, (bytes, bytearray)) else "")
                    + "; ctmask reads the functional groups of an enhanced CT (a sequence stored as VR UN of 64 KiB "
                    "or more is not parsed); convert the file to a standard encoding (e.g. dcmconv +e)", path)


def _geometry(ds: Any, frame: int | None, path: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(ImagePositionPatient, slice normal) of a slice or frame, each None when missing."""
    pos_item = _group_item(ds, frame or 0, "PlanePositionSequence", path)
    ipp = _floats(pos_item.get("ImagePositionPatient", None) if pos_item is not None else None, 3)
    if ipp is None and (frame is None or _int(ds, "NumberOfFrames", 1) == 1):
        ipp = _floats(ds.get("ImagePositionPatient", None), 3)
    ori_item = _group_item(ds, frame or 0, "PlaneOrientationSequence", path)
    iop = _floats(ori_item.get("ImageOrientationPatient", None) if ori_item is not None else None, 6)
    if iop is None:
        iop = _floats(ds.get("ImageOrientationPatient", None), 6)
    normal = None
    if iop is not None:
        n = np.cross(iop[:3], iop[3:])
        norm = float(np.linalg.norm(n))
        normal = n / norm if norm > 1e-6 else None
    return ipp, normal


def _modality(ds: Any) -> str:
    return str(ds.get("Modality", "") or "").strip().upper()


def _modality_and_frames(ds: Any, path: Path, force_modality: bool) -> int:
    """The number of frames, after refusing another modality than CT (unless forced) and a
    frame count out of range."""
    modality = _modality(ds)
    if modality and modality != CT and not force_modality:
        raise DataError(_modality_refusal(modality), path)
    frames = _int(ds, "NumberOfFrames", 1) or 1
    if not 1 <= frames <= MAX_SLICES:
        raise DataError(f"declares {frames} frames; ctmask reads 1 to {MAX_SLICES}", path)
    return frames


def _modality_refusal(modality: str) -> str:
    return f"modality {modality}: ctmask reads chest CT; pass --force-modality to predict anyway"


def probe_dicom(probe: FileProbe, path: Path, label: str, sure: bool, explicit: bool, force_modality: bool) -> bool:
    """Add a DICOM file's slices to ``probe``. True when the file was handled (added, refused,
    or skipped as a DICOM object without an image); False when it is no DICOM image. ``sure``:
    the file has a DICOM suffix or marker, so reading errors are failures."""
    try:
        check_dicom_limits(path)  # pydicom inflates a Deflated file whole and builds every sequence item
    except DataError as exc:
        probe.refuse(exc)
        return True
    except OSError as exc:
        probe.failure = error_text("cannot read file", exc)
        return True
    try:
        with captured([]):
            ds = _pydicom().dcmread(path, stop_before_pixels=True, force=True, specific_tags=_HEADER_TAGS)
    except Exception as exc:  # a decoder of untrusted bytes: any failure is this file's
        if sure:
            probe.failure = error_text("cannot decode DICOM", exc)
        return sure
    try:
        with captured([]):
            return _dicom_entries(probe, ds, path, label, sure, explicit, force_modality)
    except DataError as exc:
        probe.refuse(exc)
    except Exception as exc:
        probe.failure = error_text("cannot decode DICOM", exc)
    return True


def _dicom_entries(probe: FileProbe, ds: Any, path: Path, label: str, sure: bool, explicit: bool,
                   force_modality: bool) -> bool:
    meta = getattr(ds, "file_meta", None)
    if meta is not None and str(meta.get("MediaStorageSOPClassUID", "") or "") == DICOMDIR_CLASS:
        if explicit:
            raise DataError("a DICOMDIR is the index of a DICOM medium, not an image: pass its folder", path)
        return True
    try:
        rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    except Exception:
        if not sure:
            return False
        raise
    if not rows or not cols:
        if not sure:
            return False
        sop = ds.get("SOPClassUID", None)
        kind = str(getattr(sop, "name", "") or "")
        if sop and "image" not in kind.lower() and not explicit:
            # a report, a presentation state...: DICOM without an image, skipped in folders (and counted)
            probe.non_image = _modality(ds) or kind or str(sop)
            return True
        raise DataError("cannot decode DICOM: it holds no image (no Rows / Columns)"
                        + (f"; SOP class {kind}" if kind else ""), path)
    if (str(ds.get("SOPClassUID", "") or "") == SECONDARY_CAPTURE_CLASS
            and str(ds.get("Manufacturer", "") or "").strip() == RESULT_MANUFACTURER):
        if explicit:
            raise DataError("a Secondary Capture ctmask wrote (infer --dicom-sc): a result, not a CT slice", path)
        probe.non_image = "ctmask capture"  # skipped in folders (and counted), as its SR and GSPS are
        return True
    check_image_size(cols, rows, path)
    image_type = ds.get("ImageType", None) or []
    if isinstance(image_type, (str, bytes)):  # one value (the standard wants two or more; files differ)
        image_type = [image_type]
    image_type = [str(v).strip().upper() for v in image_type]
    if "LOCALIZER" in image_type:
        raise DataError("a localizer (scout) image, not an axial slice: skipped, and kept out of its study", path)
    frames = _modality_and_frames(ds, path, force_modality)
    series = str(ds.get("SeriesInstanceUID", "") or "") or f"folder:{path.parent}"
    study = str(ds.get("StudyInstanceUID", "") or "") or series
    instance = None
    try:
        instance = _int(ds, "InstanceNumber")
    except (TypeError, ValueError):
        pass
    uid = str(ds.get("SOPInstanceUID", "") or "")
    shared = None  # frames without per-frame groups share one geometry (and have no position)
    if frames > 1 and not ds.get("PerFrameFunctionalGroupsSequence", None):
        shared = (None, _geometry(ds, 0, path)[1])
    for k in range(frames) if frames > 1 else [None]:
        ipp, normal = shared or _geometry(ds, k, path)
        probe.dicom.append(DicomSlice(path, label if k is None else f"{label}[frame={k}]", study, series, k,
                                      ipp, normal, instance, uid))
    return True


def is_dicom_image(path: Path) -> bool:
    """True when pydicom reads ``path`` (headers only, ``force=True``) and it has Rows and Columns: a DICOM
    image without the ``DICM`` marker or a DICOM suffix (PACS exports name files ``IM0001``).

    Raises:
        DataError: the file is past the DICOM limits (:func:`~ctmask.scans.bounded.check_dicom_limits`).
    """
    check_dicom_limits(path)
    try:
        with captured([]):
            ds = _pydicom().dcmread(path, stop_before_pixels=True, force=True, specific_tags=["Rows", "Columns"])
            return bool(_int(ds, "Rows", 0)) and bool(_int(ds, "Columns", 0))
    except Exception:
        return False


# ---------------------------------------------------------------- DICOM pixels


def _dicom_dataset(path: Path, notes: list[str]) -> Any:
    """The whole dataset (pixels still encoded); the last multi-frame one is kept for its next frames
    by the thread reading it (never by the process: it goes with the thread, or the next file)."""
    try:
        key = file_key(path)
        kept = getattr(_LOCAL, "dataset", None)
        if kept is not None and kept[0] == key:
            notes.extend(kept[2])
            return kept[1]
        _LOCAL.dataset = None
        check_dicom_limits(path)
        read_notes: list[str] = []
        with captured(read_notes):
            ds = _pydicom().dcmread(path, force=True)
            frames = _int(ds, "NumberOfFrames", 1) or 1
    except DataError:
        raise
    except Exception as exc:  # a decoder of untrusted bytes: any failure is this file's
        raise DataError(error_text("cannot decode DICOM", exc), path) from None
    notes.extend(read_notes)
    if frames > 1:
        _LOCAL.dataset = (key, ds, read_notes)
    return ds


def _transfer_syntax(ds: Any) -> Any:
    """The dataset's transfer syntax; for a file without file meta, the encoding it was read with."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    ts = meta.get("TransferSyntaxUID", None)
    if ts:
        return UID(str(ts))
    enc = getattr(ds, "original_encoding", None)
    if not enc or enc[0] is None:
        enc = (getattr(ds, "is_implicit_VR", True), getattr(ds, "is_little_endian", True))
    implicit, little = (True if enc[0] is None else enc[0]), (True if enc[1] is None else enc[1])
    ts = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    meta.TransferSyntaxUID = ts
    return UID(ts)


def _decoder_packages(ts: Any) -> str:
    name = str(getattr(ts, "name", ts)).lower()
    if "2000" in name:
        return "pip install pylibjpeg pylibjpeg-openjpeg"
    if "rle" in name:
        return "pip install pylibjpeg pylibjpeg-rle"
    if "jpeg" in name:
        return "pip install pylibjpeg pylibjpeg-libjpeg"
    return "pip install python-gdcm"


def _decode_frame(ds: Any, k: int, frames: int, ts: Any, path: Path) -> np.ndarray:
    """Stored values of frame ``k`` (only that frame is decoded with pydicom >= 3)."""
    compressed = bool(getattr(ts, "is_compressed", False))
    try:
        from pydicom.pixels import get_decoder, pixel_array
    except ImportError:  # pydicom 2.x: the pixel_data_handlers decode every frame (cached on ds)
        get_decoder = pixel_array = None
    if get_decoder is not None and compressed:
        try:
            decoder = get_decoder(ts)
        except NotImplementedError:
            raise DataError(f"cannot decode DICOM pixels encoded with {ts.name} ({ts}): pydicom does not support "
                            "this transfer syntax", path) from None
        if not decoder.is_available:
            raise DataError(f"cannot decode DICOM pixels compressed with {ts.name} ({ts}): no decoder for it is "
                            f"installed; {_decoder_packages(ts)}", path)
    if compressed:  # a decoder allocates what the frame's own headers declare, whatever the data set says
        _check_frame(ds, k, frames, ts, path)
    try:
        if pixel_array is not None:
            return np.asarray(pixel_array(ds, index=k))
        arr = np.asarray(ds.pixel_array)
        return arr[k] if frames > 1 else arr
    except DataError:
        raise
    except Exception as exc:
        if compressed:
            raise DataError(error_text(f"cannot decode DICOM pixels compressed with {ts.name} ({ts})", exc)
                            + f"; another decoder may read it: {_decoder_packages(ts)}", path) from None
        raise DataError(error_text("cannot decode DICOM pixels", exc), path) from None


def _check_frame(ds: Any, k: int, frames: int, ts: Any, path: Path) -> None:
    """Refuse compressed frame ``k`` when its headers decode past the frame the data set declares."""
    try:
        from pydicom.encaps import get_frame

        extended = None
        if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
            extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
        src = get_frame(ds.PixelData, k, number_of_frames=frames, extended_offsets=extended)
        shape = (_int(ds, "Rows", 0), _int(ds, "Columns", 0), _int(ds, "SamplesPerPixel", 1) or 1,
                 _int(ds, "BitsAllocated", 16) or 16)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(error_text(f"cannot read the compressed DICOM pixels ({ts.name})", exc), path) from None
    check_compressed_frame(src, str(ts), *shape, path)


def _dicom_pixels(ds: Any, path: Path, frame: int | None, force_modality: bool) -> tuple[np.ndarray, int, dict]:
    """(stored values of the slice, frame index, info) after the checks made before decoding."""
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    if not rows or not cols or not has_pixels:
        raise DataError("cannot decode DICOM: it holds no image (no Rows / Columns / Pixel Data)", path)
    frames = _modality_and_frames(ds, path, force_modality)
    if frame is None and frames > 1:
        raise DataError(f"is a multi-frame DICOM ({frames} frames); this reads one 2-D slice: give the file to "
                        "`ctmask infer`, which predicts every frame", path)
    k = frame or 0
    if not 0 <= k < frames:
        raise DataError(f"has {frames} frames; frame {k} was asked for", path)
    check_image_size(cols, rows, path)
    ts = _transfer_syntax(ds)
    info: dict[str, Any] = {"modality": _modality(ds) or None, "transfer_syntax": str(getattr(ts, "name", ts)),
                            "photometric": str(ds.get("PhotometricInterpretation", "") or "").strip().upper()}
    if frames > 1:
        info["frames"] = frames
    measures = _group_item(ds, k, "PixelMeasuresSequence", path)
    spacing = _floats((measures if measures is not None else ds).get("PixelSpacing", None), 2)
    if spacing is not None:
        info["pixel_spacing_mm"] = [float(v) for v in spacing]
    arr = _decode_frame(ds, k, frames, ts, path)
    return arr, k, info


def _rescale_source(ds: Any, k: int, path: Path) -> Any:
    item = _group_item(ds, k, "PixelValueTransformationSequence", path)
    return item if item is not None else ds


def _is_rendered(ds: Any, k: int, path: Path) -> bool:
    """A rendering, not HU: colour, or no rescale tags / Modality LUT with at most 8 bits stored."""
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if (_int(ds, "SamplesPerPixel", 1) or 1) > 1 or photometric not in ("", "MONOCHROME1", "MONOCHROME2"):
        return True
    src = _rescale_source(ds, k, path)
    rescaled = "RescaleSlope" in src or "RescaleIntercept" in src or "ModalityLUTSequence" in ds
    bits = _int(ds, "BitsStored", None) or _int(ds, "BitsAllocated", 16) or 16
    return not rescaled and bits <= 8


def _rescale_value(ds: Any, keyword: str, default: float, path: str | Path) -> float:
    """``RescaleSlope`` / ``RescaleIntercept`` as a finite float (``default`` when absent or 0/empty)."""
    try:
        raw = ds.get(keyword, None)
    except Exception as exc:  # pydicom converts values lazily and may raise anything
        raise DataError(error_text(f"cannot read {keyword}", exc), path) from None
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except (TypeError, ValueError, OverflowError):
        raise DataError(f"{keyword} {str(raw)!r} is not a number", path) from None
    if not math.isfinite(value):
        raise DataError(f"{keyword} is {str(raw)!r}; it must be a finite number", path)
    return value or default


def _padding_mask(ds: Any, arr: np.ndarray, info: dict) -> np.ndarray | None:
    """Pixels equal to PixelPaddingValue (or within it and PixelPaddingRangeLimit), or None.

    The values are stored pixel values (before the rescale); an SS value read as US is
    taken back to its signed value. An unreadable padding value is ignored (said in ``info``).
    """
    try:
        pad, limit = ds.get("PixelPaddingValue", None), ds.get("PixelPaddingRangeLimit", None)
        if pad is None or pad == "":
            return None
        bits = _int(ds, "BitsAllocated", 16) or 16
        signed = (_int(ds, "PixelRepresentation", 0) or 0) == 1

        def stored(v: Any) -> int:
            if isinstance(v, bytes | bytearray):
                v = int.from_bytes(bytes(v[:2]), "little", signed=signed)
            elif not isinstance(v, int | float):
                v = v[0]
            v = int(v)
            return v - (1 << bits) if signed and v >= 1 << (bits - 1) else v

        lo = hi = stored(pad)
        if limit is not None and limit != "":
            lo, hi = min(lo, stored(limit)), max(hi, stored(limit))
    except Exception as exc:
        info["padding"] = error_text("PixelPaddingValue unreadable, ignored", exc)
        return None
    return (arr >= lo) & (arr <= hi)


def _dicom_hu(ds: Any, arr: np.ndarray, k: int, path: Path, info: dict) -> np.ndarray:
    """HU (float32) of stored values ``arr``: modality LUT or rescale, padding set to air."""
    if arr.ndim != 2:
        raise DataError(f"expected a 2-D grayscale slice, found pixel array of shape {arr.shape}", path)
    src = _rescale_source(ds, k, path)
    if src is ds and "ModalityLUTSequence" in ds:
        try:
            from pydicom.pixels import apply_modality_lut
        except ImportError:
            from pydicom.pixel_data_handlers.util import apply_modality_lut
        hu64 = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        info["rescale"] = "Modality LUT Sequence"
    else:
        slope = _rescale_value(src, "RescaleSlope", 1.0, path)
        intercept = _rescale_value(src, "RescaleIntercept", 0.0, path)
        if "RescaleSlope" not in src and "RescaleIntercept" not in src:
            info["rescale"] = "absent: identity assumed"
        else:
            info["rescale"] = {"slope": slope, "intercept": intercept}
        hu64 = arr.astype(np.float64) * slope + intercept
    with np.errstate(over="ignore", invalid="ignore"):
        hu = hu64.astype(np.float32)
    if not np.isfinite(hu).all():
        raise DataError(f"{int((~np.isfinite(hu)).sum())} pixels are not finite numbers after the rescale "
                        f"({info['rescale']})", path)
    mask = _padding_mask(ds, arr, info)
    if mask is not None:
        hu[mask] = AIR_HU
        info["padding_pixels"] = int(mask.sum())
    return hu


def _dicom_rendered(ds: Any, arr: np.ndarray, path: Path) -> np.ndarray:
    """A rendered DICOM image as [0, 1] gray: by its bit depth, luminance of colour, MONOCHROME1 inverted."""
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    bits = _int(ds, "BitsStored", None) or _int(ds, "BitsAllocated", 8) or 8
    if not 1 <= bits <= 32:
        raise DataError(f"BitsStored {bits} is not a bit depth", path)
    top = float((1 << bits) - 1)
    if photometric == "PALETTE COLOR":
        try:
            from pydicom.pixels import apply_color_lut
        except ImportError:
            from pydicom.pixel_data_handlers.util import apply_color_lut
        arr = np.asarray(apply_color_lut(arr, ds))
        top = float(np.iinfo(arr.dtype).max) if arr.dtype.kind in "ui" else 1.0
    values = arr.astype(np.float64)
    if (_int(ds, "PixelRepresentation", 0) or 0) == 1 and photometric != "PALETTE COLOR":
        values = values + float(1 << (bits - 1))
    values = values / top
    if values.ndim == 3:
        if values.shape[-1] < 3:
            raise DataError(f"expected 3 colour samples, found pixel array of shape {arr.shape}", path)
        values = values[..., 0] * 0.299 + values[..., 1] * 0.587 + values[..., 2] * 0.114
    if values.ndim != 2:
        raise DataError(f"expected a 2-D slice, found pixel array of shape {arr.shape}", path)
    if photometric == "MONOCHROME1":
        values = 1.0 - values
    return np.clip(values, 0.0, 1.0).astype(np.float32)


def read_dicom(path: Path, frame: int | None, window: tuple[float, float],
               force_modality: bool) -> tuple[np.ndarray, str, dict]:
    """Decode one slice or frame of a DICOM file as the module doc says: (pixels in [0, 1], kind, info).

    Raises:
        DataError: naming the file, for any problem with it.
    """
    notes: list[str] = []
    ds = _dicom_dataset(path, notes)
    try:
        with captured(notes):
            arr, k, info = _dicom_pixels(ds, path, frame, force_modality)
            if _is_rendered(ds, k, path):
                pixels, kind = _dicom_rendered(ds, arr, path), "dicom-rendered"
                info["assumed"] = "no rescale tags with 8 bits stored, or colour: a rendering, not HU"
            else:
                pixels, kind = render_hu(_dicom_hu(ds, arr, k, path, info), window), "dicom-hu"
    except DataError:
        raise
    except Exception as exc:  # pydicom converts values lazily and may raise anything
        raise DataError(error_text("cannot decode DICOM", exc), path) from None
    if notes:
        info["warnings"] = notes
    return pixels, kind, info
