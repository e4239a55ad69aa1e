"""Readers of real scans: find the slices in files and folders, decode one slice.

:func:`collect_sources` expands files and folders into :class:`~ctmask.runtime.sources.SliceRef`
(one per slice, DICOM series and studies grouped and ordered); :func:`read_slice` decodes one
into a :class:`~ctmask.runtime.sources.DecodedSlice`: float32 [H, W] in [0, 1], in the file's
own pixel frame (no resize). Training reads its slices through the same decoding
(:func:`ctmask.core.preprocess.read_gray` calls :func:`read_single`).

Rules, fixed per file type and never scaled by a slice's own content:

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
* **NIfTI** (``nifti-hu``): values (after the header's scl_slope / scl_inter) are assumed to
  be HU. Slices run along the array axis closest to the patient's z (nibabel's
  ``io_orientation``; nothing is resampled), ordered inferior to superior: ``frame`` k is the
  k-th slice in that order, ``position`` its z in mm. Each slice is flipped to canonical RAS+
  axes ``c[x, y]`` (x towards the patient's right, y anterior) and shown as a DICOM axial slice
  is: rows anterior to posterior, columns patient right to left: ``display = c[::-1, ::-1].T``.
  A 4-D file with more than one volume is refused (which volume is the CT cannot be told), and
  so is a file whose qform_code and sform_code are both 0: its orientation is unknown (nibabel
  would fall back to one guessed from the voxel sizes), so which axis is the patient's z cannot
  be told.
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

Finding slices (:func:`collect_sources`): folders are walked recursively in sorted order,
hidden files and folders (``.name``) and DICOMDIR skipped. Files with a raster or NIfTI
suffix are taken as such; DICOM is a DICOM suffix, the ``DICM`` marker, or (PACS exports:
``IM0001``, ``1.2.840...``) a file without suffix or with a numeric one that pydicom reads
(``force=True``, headers only) and that has Rows and Columns. DICOM objects without an image
(reports, presentation states, RT plans) and other files are skipped in folders, the DICOM
ones counted by modality (else SOP class) in one :class:`~ctmask.core.errors.CtmaskWarning`
("ignored 3 non-image DICOM objects: RTPLAN 3"); a folder without any slice is a failure. DICOM
slices sharing one SOPInstanceUID (and frame) are copies of one instance: only the one in the
largest file (a truncated copy is shorter), else the first found, is kept, with one warning.
DICOM slices are grouped by SeriesInstanceUID (files without one: by folder) and
StudyInstanceUID; ``frame`` of a multi-frame DICOM is the stored frame index.

Sizes are checked on what a file declares, before its pixels are decoded
(:func:`ctmask.core.preprocess.check_image_size`: 32..8192 px per side; Pillow's
decompression-bomb warning and error become :class:`DataError` too).
Every limit is in :mod:`ctmask.core.limits` (one table), checked before the memory is spent:
a Deflated DICOM is inflated in a stream, counted, before pydicom inflates it whole; sequence
items are counted on the raw bytes before pydicom builds them (:mod:`ctmask.core.bounded`); a
NIfTI slice's and volume's bytes are checked on its header, and a ``.nii.gz`` is read slice by
slice from one stream (:class:`~ctmask.core.bounded.GzipCursor`), never held whole.

Every problem with a file is a :class:`DataError` from :func:`read_slice` and a ``Failure``
from :func:`collect_sources`, which never raises for a file. Warnings the decoders emit
(pydicom, nibabel, Pillow: ``warnings`` and their loggers) are not printed: they are kept in
``DecodedSlice.info["warnings"]``. Several slices of one DICOM series at the same position
are all kept; :func:`collect_sources` says so with one :class:`~ctmask.core.errors.CtmaskWarning`
per series.

nibabel is imported when a NIfTI file is read; pydicom when a DICOM file is.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import BmpImagePlugin, Image, JpegImagePlugin, PngImagePlugin, TiffImagePlugin

from ctmask.core.bounded import GzipCursor, check_compressed_frame, check_dicom_limits, gzip_holds
from ctmask.core.errors import CtmaskWarning, DataError
from ctmask.core.limits import MAX_NIFTI_HEADER_BYTES, MAX_SLICE_BYTES, MAX_SLICES, MAX_VOLUME_BYTES, MiB, mib
from ctmask.core.preprocess import DICOM_SUFFIXES, LUNG_WINDOW, MAX_IMAGE_SIDE, check_image_size, window_hu

if TYPE_CHECKING:
    from ctmask.runtime.predict import Failure
    from ctmask.runtime.sources import DecodedSlice, SliceRef

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
"""Suffixes read with Pillow."""

NIFTI_SUFFIXES = (".nii", ".nii.gz")
"""Suffixes read with nibabel."""

RASTER_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "DIB")
"""Pillow formats tried on a raster image (no other decoder sees untrusted bytes)."""
_PLUGINS = (BmpImagePlugin, JpegImagePlugin, PngImagePlugin, TiffImagePlugin)  # registers them

DEFAULT_HU_OFFSET = 1024.0
"""What 16-bit unsigned images add to HU (HU + 1024 >= 0 for anything above -1024 HU)."""

AIR_HU = -1000.0
"""What padding pixels (PixelPaddingValue) become."""

CT = "CT"
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
_HEADER_TAGS = ["SOPClassUID", "SOPInstanceUID", "Modality", "ImageType", "StudyInstanceUID", "SeriesInstanceUID",
                "ImagePositionPatient", "ImageOrientationPatient", "InstanceNumber", "NumberOfFrames", "Rows",
                "Columns", "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "SpecificCharacterSet"]
_DECODER_LOGGERS = ("pydicom", "nibabel", "nibabel.global", "PIL")
_DECODER_PACKAGES = tuple(f"{os.sep}{p}{os.sep}" for p in ("pydicom", "PIL", "nibabel", "numpy"))
_MAX_NOTES = 20


# ---------------------------------------------------------------- warnings of the decoders


_LOCAL = threading.local()  # .notes: the list the current thread's decoder warnings go to
_CAPTURE_LOCK = threading.Lock()
_CAPTURE: dict[str, Any] = {"depth": 0}


def _note(notes: list[str], text: str) -> None:
    text = " ".join(str(text).split())
    if text and text not in notes and len(notes) < _MAX_NOTES:
        notes.append(text)


class _Dispatch(logging.Handler):
    """A decoder logger's record goes to the notes of the thread decoding, else to the logger's own handlers."""

    def __init__(self, original: list[logging.Handler]):
        super().__init__(logging.NOTSET)
        self.original = original

    def emit(self, record: logging.LogRecord) -> None:
        notes = getattr(_LOCAL, "notes", None)
        try:
            if notes is None:
                for handler in self.original:
                    if record.levelno >= handler.level:
                        handler.handle(record)
            elif record.levelno >= logging.WARNING:
                _note(notes, record.getMessage())
        except Exception:  # a malformed log record must not break decoding
            pass


def _show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
          line: str | None = None) -> None:
    notes = getattr(_LOCAL, "notes", None)
    name = str(filename)
    if notes is not None and (name == __file__ or any(p in name for p in _DECODER_PACKAGES)):
        _note(notes, str(message))
    else:
        _CAPTURE["showwarning"](message, category, filename, lineno, file, line)


def _install_capture() -> None:
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("always")  # every file's warnings, not only the first one's
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    _CAPTURE.update(ctx=ctx, showwarning=warnings.showwarning, loggers=[])
    warnings.showwarning = _show
    for name in _DECODER_LOGGERS:  # their own handlers too: nibabel's logger prints to stderr
        logger = logging.getLogger(name)
        _CAPTURE["loggers"].append((logger, logger.handlers[:], logger.propagate))
        logger.handlers = [_Dispatch(logger.handlers[:])]
        logger.propagate = False


def _remove_capture() -> None:
    for logger, handlers, propagate in _CAPTURE.pop("loggers"):
        logger.handlers = handlers
        logger.propagate = propagate
    _CAPTURE.pop("showwarning")
    _CAPTURE.pop("ctx").__exit__(None, None, None)


@contextmanager
def _captured(notes: list[str]) -> Iterator[None]:
    """Keep the decoders' (pydicom, nibabel, Pillow) warnings and log records in ``notes`` instead
    of printing them; Pillow's decompression-bomb warning is raised as an error.

    The capture is shared by the threads decoding at the same time (the first one installs it,
    the last one removes it; each thread's records go to its own ``notes``); other warnings and
    records, and other threads', go where they went before. Python's warning filters are
    process-wide: while a capture is on, every warning is shown each time it occurs.
    """
    outer = getattr(_LOCAL, "notes", None)
    with _CAPTURE_LOCK:
        if _CAPTURE["depth"] == 0:
            _install_capture()
        _CAPTURE["depth"] += 1
    _LOCAL.notes = notes
    try:
        yield
    finally:
        _LOCAL.notes = outer
        with _CAPTURE_LOCK:
            _CAPTURE["depth"] -= 1
            if _CAPTURE["depth"] == 0:
                _remove_capture()


# ---------------------------------------------------------------- what a file is


def _sniff(path: Path) -> str:
    """``dicom`` (DICM marker or DICOM suffix), ``nifti``, ``image``, ``maybe-dicom`` (no suffix or
    a numeric one, as PACS exports name files) or ``""``. Raises OSError when unreadable."""
    with open(path, "rb") as fh:
        head = fh.read(132)
    if len(head) == 132 and head[128:] == b"DICM":
        return "dicom"
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    suffix = path.suffix.lower()
    if suffix in RASTER_SUFFIXES:
        return "image"
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    if suffix == "" or suffix[1:].isdigit():
        return "maybe-dicom"
    return ""


def _is_raster(path: Path) -> bool:
    """True when Pillow identifies ``path`` as one of :data:`RASTER_FORMATS` (header only)."""
    try:
        with _captured([]), Image.open(path, formats=RASTER_FORMATS):
            return True
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return True  # a raster image declaring too many pixels (the warning is an error here): decoding says so
    except Exception:
        return False


def _error(what: str, exc: BaseException) -> str:
    if isinstance(exc, MemoryError):
        return f"{what} (not enough memory: the file declares more data than can be held)"
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{what} ({exc.__class__.__name__}: {text})" if text else f"{what} ({exc.__class__.__name__})"


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


# ---------------------------------------------------------------- collecting


@dataclass
class _DicomSlice:
    path: Path
    label: str
    study: str
    series: str
    frame: int | None
    ipp: np.ndarray | None
    normal: np.ndarray | None
    instance: int | None
    uid: str = ""  # SOPInstanceUID: the slice's identity for `infer --resume`


@dataclass(frozen=True)
class FileTask:
    """One file found while listing the inputs, to be probed (:func:`probe_file`).

    Attributes:
        path: the file.
        label: what reports call it (relative to the input folder's parent).
        explicit: named on the command line (taken whatever its suffix) rather than found in a folder.
    """

    path: str
    label: str
    explicit: bool


@dataclass
class FileProbe:
    """What a file holds (:func:`probe_file`): ready slices (images, NIfTI), DICOM slices still
    to be grouped into series and ordered, or the reason it was refused. Picklable: probes may
    be computed in other processes (``infer --ray``) and assembled in the caller."""

    slices: list[SliceRef] = field(default_factory=list)
    dicom: list[_DicomSlice] = field(default_factory=list)
    failure: str | None = None
    non_image: str = ""  # a DICOM object without an image, skipped: its modality (else SOP class)


@dataclass(frozen=True)
class _FolderMark:
    """Start (``end=False``) or end of an input folder's files in the listing."""

    root: str
    end: bool


def list_inputs(inputs: list[str | Path]) -> list[FileTask | Failure | _FolderMark]:
    """The files of ``inputs`` in input order (folders walked recursively, sorted; hidden files
    and folders skipped; each file once), paths that cannot be listed as failures. Cheap: no
    file is opened; :func:`probe_file` reads each one."""
    from ctmask.runtime.predict import Failure

    items: list[FileTask | Failure | _FolderMark] = []
    seen: set[str] = set()

    def add(path: Path, label: str, explicit: bool) -> None:
        try:
            key = str(path.resolve())
        except (OSError, RuntimeError):
            key = str(path.absolute())
        if key not in seen:
            seen.add(key)
            items.append(FileTask(str(path), label, explicit))

    for item in inputs:
        path = Path(item)
        try:
            is_dir, is_file = path.is_dir(), path.is_file()
        except OSError as exc:
            items.append(Failure(str(path), _error("cannot read", exc)))
            continue
        if is_file:
            add(path, path.name, explicit=True)
        elif not is_dir:
            reason = "not a regular file or folder" if path.exists() else "no such file or folder"
            items.append(Failure(str(path), reason))
        else:
            items.append(_FolderMark(str(path), end=False))
            files: list[Path] = []

            def unreadable(exc: OSError, root: Path = path) -> None:
                items.append(Failure(str(exc.filename or root), _error("cannot list folder", exc)))

            for folder, dirs, names in os.walk(path, onerror=unreadable):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                # Regular files only: opening a named pipe would wait for a writer forever.
                files.extend(p for p in (Path(folder) / n for n in names if not n.startswith(".")) if p.is_file())
            for file in sorted(files):
                try:
                    label = str(file.relative_to(path.parent)) if path.name not in ("", "..") else str(file)
                except ValueError:
                    label = str(file)
                add(file, label, explicit=False)
            items.append(_FolderMark(str(path), end=True))
    return items


def probe_file(task: FileTask, force_modality: bool = False) -> FileProbe:
    """What one file holds: its slices (headers only; no pixels are decoded), or why it is refused.

    Never raises for anything about the file: every problem is the probe's ``failure``.
    """
    from ctmask.runtime.sources import SliceRef

    path, label, explicit = Path(task.path), task.label, task.explicit
    probe = FileProbe()
    if path.name.upper() == "DICOMDIR":
        if explicit:
            probe.failure = "a DICOMDIR is the index of a DICOM medium, not an image: pass its folder"
        return probe
    try:
        kind = _sniff(path)
    except OSError as exc:
        probe.failure = _error("cannot read file", exc)
        return probe
    if kind == "image":
        probe.slices.append(SliceRef(path=str(path), study=str(path), series=str(path), label=label))
    elif kind == "nifti":
        try:
            vol = _NiftiVolume.open(path)
            vol.check_present()
            probe.slices.extend(SliceRef(path=str(path), frame=k, study=str(path), series=str(path),
                                         position=vol.z_mm(k), label=f"{label}[z={k}]") for k in range(vol.nz))
        except DataError as exc:
            probe.failure = exc.message
        except Exception as exc:  # defensive: nothing about one file may stop the others
            probe.failure = _error("cannot read NIfTI", exc)
    elif kind in ("dicom", "maybe-dicom") or explicit:
        if not _probe_dicom(probe, path, label, kind == "dicom", explicit, force_modality) and explicit:
            if _is_raster(path):
                probe.slices.append(SliceRef(path=str(path), study=str(path), series=str(path), label=label))
            else:
                probe.failure = "not an image (" + " ".join(RASTER_SUFFIXES) + "), DICOM or NIfTI file"
    return probe


def _probe_dicom(probe: FileProbe, path: Path, label: str, sure: bool, explicit: bool, force_modality: bool) -> bool:
    """Add a DICOM file's slices to ``probe``. True when the file was handled (added, refused,
    or skipped as a DICOM object without an image); False when it is no DICOM image. ``sure``:
    the file has a DICOM suffix or marker, so reading errors are failures."""
    try:
        check_dicom_limits(path)  # pydicom inflates a Deflated file whole and builds every sequence item
    except DataError as exc:
        probe.failure = exc.message
        return True
    except OSError as exc:
        probe.failure = _error("cannot read file", exc)
        return True
    try:
        with _captured([]):
            ds = _pydicom().dcmread(path, stop_before_pixels=True, force=True, specific_tags=_HEADER_TAGS)
    except Exception as exc:  # a decoder of untrusted bytes: any failure is this file's
        if sure:
            probe.failure = _error("cannot decode DICOM", exc)
        return sure
    try:
        with _captured([]):
            return _dicom_entries(probe, ds, path, label, sure, explicit, force_modality)
    except DataError as exc:
        probe.failure = exc.message
    except Exception as exc:
        probe.failure = _error("cannot decode DICOM", exc)
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
        probe.dicom.append(_DicomSlice(path, label if k is None else f"{label}[frame={k}]", study, series, k,
                                       ipp, normal, instance, uid))
    return True


def assemble(items: list[FileTask | Failure | _FolderMark], probes: list[FileProbe]) -> tuple[list[SliceRef],
                                                                                             list[Failure]]:
    """The slices and failures of a listing (:func:`list_inputs`) from its files' probes (one per
    :class:`FileTask`, in listing order): DICOM slices grouped by series and ordered (a series
    comes where its first file does); a folder that gave no slice is a failure."""
    from ctmask.runtime.predict import Failure
    from ctmask.runtime.sources import SliceRef

    slots: list[list[SliceRef] | str] = []  # ready slices, or a series key
    series: dict[str, list[_DicomSlice]] = {}
    failures: list[Failure] = []
    opened: list[tuple[int, int]] = []  # per open folder: slices and failures before it
    n_slices = 0
    non_image: dict[str, int] = {}
    probe_iter = iter(probes)
    for item in items:
        if isinstance(item, _FolderMark):
            if not item.end:
                opened.append((n_slices, len(failures)))
                continue
            before, failed = opened.pop()
            if n_slices == before:
                if len(failures) > failed:
                    failures.append(Failure(item.root, f"folder holds no readable slice ({len(failures) - failed} "
                                                       "files failed)"))
                else:
                    failures.append(Failure(item.root, "folder holds no image (" + " ".join(RASTER_SUFFIXES)
                                                       + "), DICOM or NIfTI file"))
        elif isinstance(item, FileTask):
            probe = next(probe_iter)
            if probe.failure is not None:
                failures.append(Failure(item.path, probe.failure))
            if probe.slices:
                slots.append(probe.slices)
            if probe.non_image:
                non_image[probe.non_image] = non_image.get(probe.non_image, 0) + 1
            for e in probe.dicom:
                if e.series not in series:
                    series[e.series] = []
                    slots.append(e.series)
                series[e.series].append(e)
            n_slices += len(probe.slices) + len(probe.dicom)
        else:
            failures.append(item)
    if next(probe_iter, None) is not None:
        raise ValueError("more probes than files in the listing")
    copies = _drop_copies(series)
    if copies:
        copy, kept = copies[0]
        warnings.warn(f"{len(copies)} DICOM slice(s) dropped as copies of another file's (same SOPInstanceUID"
                      f"{' and frame' if copy.frame is not None else ''}; e.g. {copy.label} copies {kept.label}; the "
                      "largest file is kept): each instance is predicted once", CtmaskWarning, stacklevel=3)
    if non_image:
        n = sum(non_image.values())
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(non_image.items(), key=lambda kv: (-kv[1], kv[0])))
        warnings.warn(f"ignored {n} non-image DICOM object{'s' if n != 1 else ''}: {kinds}", CtmaskWarning,
                      stacklevel=3)
    refs: list[SliceRef] = []
    for slot in slots:
        if isinstance(slot, list):
            refs.extend(slot)
            continue
        for e, position in _order_series(slot, series[slot]):
            refs.append(SliceRef(path=str(e.path), frame=e.frame, study=e.study, series=e.series, position=position,
                                 label=e.label, uid=e.uid))
    return refs, failures


def _drop_copies(series: dict[str, list[_DicomSlice]]) -> list[tuple[_DicomSlice, _DicomSlice]]:
    """Keep one slice per (SOPInstanceUID, frame) in ``series`` (edited in place): the one in the
    largest file (a truncated copy is shorter), else the first found; (dropped, kept) pairs."""
    groups: dict[tuple[str, int | None], list[_DicomSlice]] = {}
    for entries in series.values():
        for e in entries:
            if e.uid:
                groups.setdefault((e.uid, e.frame), []).append(e)

    def size(e: _DicomSlice) -> int:
        try:
            return e.path.stat().st_size
        except OSError:
            return -1

    pairs = []
    for group in groups.values():
        if len(group) > 1:
            kept = max(group, key=size)  # the first of the largest
            pairs += [(e, kept) for e in group if e is not kept]
    dropped = {id(e) for e, _ in pairs}
    for key in series:
        series[key] = [e for e in series[key] if id(e) not in dropped]
    return pairs


def _order_series(series: str, entries: list[_DicomSlice]) -> list[tuple[_DicomSlice, float | None]]:
    """Slices of one series in order: position along the slice normal, else InstanceNumber,
    else file name (and frame). Several slices at one position are kept, with a warning."""

    def name_key(e: _DicomSlice) -> tuple:
        return (str(e.path), -1 if e.frame is None else e.frame)

    if all(e.ipp is not None for e in entries):
        normal = next((e.normal for e in entries if e.normal is not None), np.array([0.0, 0.0, 1.0]))
        tilted = [e for e in entries if e.normal is not None and abs(float(np.dot(e.normal, normal))) < 0.99]
        if tilted:
            warnings.warn(f"DICOM series {series}: {len(tilted)} of its {len(entries)} slices have another orientation "
                          f"than the first (e.g. {tilted[0].label}); all are ordered along the first slice's normal",
                          CtmaskWarning, stacklevel=4)
        pos = [float(np.dot(e.ipp, normal)) for e in entries]
        order = sorted(range(len(entries)), key=lambda i: (pos[i], entries[i].instance or 0, name_key(entries[i])))
        same = [(order[j - 1], order[j]) for j in range(1, len(order)) if abs(pos[order[j]] - pos[order[j - 1]]) < 1e-3]
        if same:
            a, b = same[0]
            warnings.warn(f"DICOM series {series}: {len(same)} of its {len(entries)} slices share their position "
                          f"with another (e.g. {entries[a].label} and {entries[b].label} at {pos[a]:.2f} mm); "
                          "all are kept and predicted", CtmaskWarning, stacklevel=4)
        return [(entries[i], pos[i]) for i in order]
    if all(e.instance is not None for e in entries):
        ordered = sorted(entries, key=lambda e: (e.instance, name_key(e)))
        return [(e, float(e.instance) if e.frame is None else None) for e in ordered]
    return [(e, None) for e in sorted(entries, key=name_key)]


def collect_sources(inputs: list[str | Path], force_modality: bool = False,
                    probe_all: Callable[[list[FileTask]], Iterable[FileProbe]] | None = None,
                    ) -> tuple[list[SliceRef], list[Failure]]:
    """Expand files and folders (recursively, in sorted order) into the slices to predict.

    Folders contribute raster images (:data:`RASTER_SUFFIXES`), NIfTI volumes (one slice per
    axial slice), DICOM files (a DICOM suffix, the ``DICM`` marker, or a file without suffix
    or with a numeric one that pydicom reads with ``force=True`` and that holds Rows and
    Columns); other files, hidden ones and DICOMDIR are skipped. A file given by name is
    also taken when Pillow recognises it. DICOM slices are grouped by SeriesInstanceUID
    (study: StudyInstanceUID) across all inputs and ordered by position along the slice
    normal, else InstanceNumber, else file name; a series comes where its first file does.

    Args:
        inputs: files and folders.
        force_modality: accept DICOM of modalities other than CT.
        probe_all: probes a list of files (:func:`probe_file` on each, in order; ``infer --ray``
            runs them in Ray tasks); default: one after the other here.

    Returns:
        (slices, failures): every unreadable or refused file, missing path and folder without
        any slice is a ``Failure`` (file, reason); nothing is raised for a bad file. Slices of
        a series sharing one position are kept, with a :class:`CtmaskWarning`.
    """
    items = list_inputs(inputs)
    tasks = [item for item in items if isinstance(item, FileTask)]
    if probe_all is None:
        probes = [probe_file(task, force_modality) for task in tasks]
    else:
        probes = list(probe_all(tasks))
        if len(probes) != len(tasks):
            raise ValueError(f"probe_all returned {len(probes)} probes for {len(tasks)} files")
    return assemble(items, probes)


# ---------------------------------------------------------------- decoding


def read_slice(ref: SliceRef, window: tuple[float, float] = LUNG_WINDOW, force_modality: bool = False,
               hu_offset: float = DEFAULT_HU_OFFSET) -> DecodedSlice:
    """Decode one slice to float32 [H, W] in [0, 1] in the file's pixel frame (rules: module doc).

    Args:
        ref: the slice (from :func:`collect_sources`).
        window: (level, width) in HU for inputs in HU.
        force_modality: decode DICOM of modalities other than CT.
        hu_offset: what 16-bit (and non-negative 32-bit) integer images add to HU.

    Raises:
        DataError: naming the file, for any problem with it (never another exception).
    """
    from ctmask.runtime.sources import DecodedSlice

    pixels, kind, info = _decode(Path(ref.path), ref.frame, window, force_modality, hu_offset)
    return DecodedSlice(ref=ref, pixels=pixels, kind=kind, info=info)


def read_single(path: str | Path, window: tuple[float, float] = LUNG_WINDOW, force_modality: bool = False,
                hu_offset: float = DEFAULT_HU_OFFSET) -> np.ndarray:
    """Decode a single-slice file (an image, a single-frame DICOM) like :func:`read_slice`.

    Raises:
        DataError: any problem, and for a multi-frame DICOM or a NIfTI volume (``ctmask infer``
            predicts each of their slices).
    """
    return _decode(Path(path), None, window, force_modality, hu_offset)[0]


def read_dicom_hu(path: str | Path, frame: int | None = None) -> np.ndarray:
    """Hounsfield units (float32 [H, W]) of a DICOM slice or frame, any modality, padding as air.

    Raises:
        DataError: the file is not a DICOM image in HU (see the module doc) or cannot be decoded.
    """
    path = Path(path)
    notes: list[str] = []
    ds = _dicom_dataset(path, notes)
    try:
        with _captured(notes):
            arr, k, info = _dicom_pixels(ds, path, frame, force_modality=True)
            if _is_rendered(ds, k, path):
                raise DataError("holds a rendered image (no rescale tags, 8 bits or colour), not HU", path)
            return _dicom_hu(ds, arr, k, path, info)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(_error("cannot decode DICOM", exc), path) from None


def _decode(path: Path, frame: int | None, window: tuple[float, float], force_modality: bool,
            hu_offset: float) -> tuple[np.ndarray, str, dict]:
    try:
        try:
            if not path.is_file():  # a named pipe would block the read
                raise DataError("image file does not exist" if not path.exists() else
                                "is a folder, not an image file" if path.is_dir() else "not a regular file", path)
            kind = _sniff(path)
        except OSError as exc:
            raise DataError(_error("cannot read file", exc), path) from None
        if kind == "nifti":
            pixels, name, info = _read_nifti(path, frame, window)
        elif kind == "image":
            pixels, name, info = _read_raster(path, frame, window, hu_offset)
        elif kind == "dicom":
            pixels, name, info = _read_dicom(path, frame, window, force_modality)
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
        raise DataError(_error("cannot decode", exc), path) from None


def _read_unknown(path: Path, frame: int | None, window: tuple[float, float], force_modality: bool,
                  hu_offset: float) -> tuple[np.ndarray, str, dict]:
    """A file without a known suffix or marker: a DICOM image pydicom can read, else a raster image."""
    check_dicom_limits(path)
    try:
        with _captured([]):
            ds = _pydicom().dcmread(path, stop_before_pixels=True, force=True, specific_tags=["Rows", "Columns"])
            dicom = bool(_int(ds, "Rows", 0)) and bool(_int(ds, "Columns", 0))
    except Exception:
        dicom = False
    if dicom:
        return _read_dicom(path, frame, window, force_modality)
    if _is_raster(path):
        return _read_raster(path, frame, window, hu_offset)
    raise DataError("cannot decode image: not an image (" + " ".join(RASTER_SUFFIXES) + "), DICOM or NIfTI file",
                    path)


# ---------------------------------------------------------------- raster images


def _read_raster(path: Path, frame: int | None, window: tuple[float, float],
                 hu_offset: float) -> tuple[np.ndarray, str, dict]:
    if frame not in (None, 0):
        raise DataError(f"an image file holds one slice; frame {frame} was asked for", path)
    notes: list[str] = []
    try:
        with _captured(notes), Image.open(path, formats=RASTER_FORMATS) as im:
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
        raise DataError(f"image declares too many pixels ({exc}); the maximum is "
                        f"{MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}, refused before decoding", path) from None
    except Exception as exc:  # a decoder of untrusted bytes: any failure is this file's
        raise DataError(_error("cannot decode image", exc), path) from None
    info["assumed"] = assumed
    if notes:
        info["warnings"] = notes
    return pixels, kind, info


MIN_TISSUE_HU = -1024.0
"""Below this no tissue or air exists: such values are scanners' markers of pixels outside the
reconstruction circle (padding such as -2000 or -3024, kept by converters like dcm2niix even
where the DICOM said ``PixelPaddingValue``). They are rendered as air, as DICOM padding is."""


def render_hu(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """HU -> [0, 1] with ``window``; values below :data:`MIN_TISSUE_HU` are taken as air first."""
    hu = np.asarray(hu)
    below = hu < MIN_TISSUE_HU
    if below.any():
        hu = np.where(below, AIR_HU, hu)
    return window_hu(hu, *window)


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


# ---------------------------------------------------------------- DICOM pixels




def _file_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def _dicom_dataset(path: Path, notes: list[str]) -> Any:
    """The whole dataset (pixels still encoded); the last multi-frame one is kept for its next frames
    by the thread reading it (never by the process: it goes with the thread, or the next file)."""
    try:
        key = _file_key(path)
        kept = getattr(_LOCAL, "dataset", None)
        if kept is not None and kept[0] == key:
            notes.extend(kept[2])
            return kept[1]
        _LOCAL.dataset = None
        check_dicom_limits(path)
        read_notes: list[str] = []
        with _captured(read_notes):
            ds = _pydicom().dcmread(path, force=True)
            frames = _int(ds, "NumberOfFrames", 1) or 1
    except DataError:
        raise
    except Exception as exc:  # a decoder of untrusted bytes: any failure is this file's
        raise DataError(_error("cannot decode DICOM", exc), path) from None
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
            raise DataError(_error(f"cannot decode DICOM pixels compressed with {ts.name} ({ts})", exc)
                            + f"; another decoder may read it: {_decoder_packages(ts)}", path) from None
        raise DataError(_error("cannot decode DICOM pixels", exc), path) from None


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
        raise DataError(_error(f"cannot read the compressed DICOM pixels ({ts.name})", exc), path) from None
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
        raise DataError(_error(f"cannot read {keyword}", exc), path) from None
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
        info["padding"] = _error("PixelPaddingValue unreadable, ignored", exc)
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


def _read_dicom(path: Path, frame: int | None, window: tuple[float, float],
                force_modality: bool) -> tuple[np.ndarray, str, dict]:
    notes: list[str] = []
    ds = _dicom_dataset(path, notes)
    try:
        with _captured(notes):
            arr, k, info = _dicom_pixels(ds, path, frame, force_modality)
            if _is_rendered(ds, k, path):
                pixels, kind = _dicom_rendered(ds, arr, path), "dicom-rendered"
                info["assumed"] = "no rescale tags with 8 bits stored, or colour: a rendering, not HU"
            else:
                pixels, kind = render_hu(_dicom_hu(ds, arr, k, path, info), window), "dicom-hu"
    except DataError:
        raise
    except Exception as exc:  # pydicom converts values lazily and may raise anything
        raise DataError(_error("cannot decode DICOM", exc), path) from None
    if notes:
        info["warnings"] = notes
    return pixels, kind, info


# ---------------------------------------------------------------- NIfTI


def _nibabel(path: Path) -> Any:
    try:
        import nibabel
    except ImportError:
        raise DataError("reading NIfTI needs nibabel: pip install nibabel", path) from None
    return nibabel


def _nifti_header_check(path: Path) -> None:
    """Refuse a NIfTI file whose voxels start past :data:`MAX_NIFTI_HEADER_BYTES` (nibabel reads
    the header's extensions whole); reads the first 544 bytes only."""
    import gzip
    import struct

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as fh:
        head = fh.read(544)
    for order in "<>":
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348:
            offset = struct.unpack(order + "f", head[108:112])[0]
        elif len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540:
            offset = struct.unpack(order + "q", head[168:176])[0]
        else:
            continue
        if not offset <= MAX_NIFTI_HEADER_BYTES:
            raise DataError(f"its voxels start at byte {offset:g}, past the {mib(MAX_NIFTI_HEADER_BYTES)} a NIfTI "
                            "header and its extensions may take (refused before reading them)", path)


def _gz_cursor(path: Path, keep: bool, every: int) -> GzipCursor:
    """A cursor into ``path``'s gzip stream; with ``keep``, the thread's cursor, kept while it reads
    this file (the next volume, or the thread's end, closes it): slices read in turn inflate the
    file once. Without, a cursor of its own (the caller closes it). ``every``: bytes between its
    checkpoints."""
    if not keep:
        return GzipCursor(path, every)
    key = _file_key(path)
    kept = getattr(_LOCAL, "gz", None)
    if kept is not None and kept[0] == key:
        return kept[1]
    if kept is not None:
        kept[1].close()
    _LOCAL.gz = None
    cursor = GzipCursor(path, every)
    _LOCAL.gz = (key, cursor)
    return cursor


@dataclass
class _NiftiVolume:
    """A NIfTI volume's header facts: which array axes are x, y, z in RAS+ and their flips."""

    path: Path
    img: Any
    axes: tuple[int, int, int]  # array axes of x (R), y (A), z (S)
    flips: tuple[int, int, int]  # +1 when the array axis runs towards R / A / S
    shape: tuple[int, ...]  # spatial shape, 3 entries
    notes: list[str]

    @property
    def nz(self) -> int:
        return self.shape[self.axes[2]]

    @classmethod
    def open(cls, path: Path) -> _NiftiVolume:
        nib = _nibabel(path)
        notes: list[str] = []
        try:
            _nifti_header_check(path)
            with _captured(notes):
                img = nib.load(str(path), mmap=False)
                shape = tuple(int(v) for v in img.shape)
                affine = np.asarray(img.affine, dtype=np.float64)
                dtype = np.dtype(img.get_data_dtype())
                codes = [int(img.header.get(k, -1)) for k in ("qform_code", "sform_code")]
        except DataError:
            raise
        except Exception as exc:  # nibabel's ImageFileError, HeaderDataError, struct.error, OSError...
            raise DataError(_error("cannot read NIfTI", exc), path) from None
        if codes == [0, 0]:
            raise DataError("its orientation is unknown (qform_code and sform_code are both 0), so which axis is the "
                            "patient's z cannot be told; give it its scanner affine (e.g. nibabel's set_sform(affine, "
                            "code=1)) or convert the scan again (dcm2niix writes both)", path)
        if dtype.fields is not None or dtype.kind not in "biuf":
            raise DataError(f"voxels of type {dtype} are not CT values (expected integers or floats)", path)
        if len(shape) < 2 or min(shape) < 1:
            raise DataError(f"volume of shape {shape} holds no 2-D slice", path)
        if len(shape) > 3 and math.prod(shape[3:]) != 1:
            raise DataError(f"is a {len(shape)}-D volume of shape {shape} ({math.prod(shape[3:])} volumes); ctmask "
                            "reads one 3-D CT volume: save the volume to predict as its own file", path)
        if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise DataError("its affine (voxel to patient coordinates) is missing, singular or not finite", path)
        ornt = nib.orientations.io_orientation(affine)
        if not np.isfinite(ornt).all():
            raise DataError("cannot tell the orientation of its axes from the affine", path)
        axes = tuple(int(np.flatnonzero(ornt[:, 0] == a)[0]) for a in range(3))
        flips = tuple(int(ornt[axes[a], 1]) for a in range(3))
        spatial = (shape + (1,))[:3]
        if len(shape) == 2 and axes[2] != 2:
            raise DataError("is a 2-D image that is not an axial slice", path)
        check_image_size(spatial[axes[0]], spatial[axes[1]], path)
        if not 1 <= spatial[axes[2]] <= MAX_SLICES:
            raise DataError(f"declares {spatial[axes[2]]} slices; ctmask reads 1 to {MAX_SLICES}", path)
        slice_bytes = spatial[axes[0]] * spatial[axes[1]] * dtype.itemsize
        if slice_bytes > MAX_SLICE_BYTES:
            raise DataError(f"a slice of {spatial[axes[0]]}x{spatial[axes[1]]} {dtype} voxels holds "
                            f"{mib(slice_bytes)}, more than the limit of {mib(MAX_SLICE_BYTES)} (refused before "
                            "reading it)", path)
        volume_bytes = math.prod(spatial) * dtype.itemsize
        if volume_bytes > MAX_VOLUME_BYTES:
            raise DataError(f"declares a volume of {mib(volume_bytes)}, more than the limit of "
                            f"{mib(MAX_VOLUME_BYTES)} (refused before reading it)", path)
        if path.name.lower().endswith(".gz") and len(shape) > 2 and axes[2] != 2 and volume_bytes > MAX_SLICE_BYTES:
            raise DataError(f"a compressed volume of {mib(volume_bytes)} whose axial slices are not its last array "
                            f"axis: each slice needs the whole volume, which may take up to {mib(MAX_SLICE_BYTES)} "
                            "compressed; decompress it (gunzip) and read the .nii", path)
        return cls(path, img, axes, flips, spatial, notes)

    def check_present(self) -> None:
        """Refuse a file holding fewer voxels than its header declares (truncated, or a header that
        lies): one failure for the file rather than one per missing slice.

        Raises:
            DataError: naming the slices declared and the bytes present.
        """
        dataobj = self.img.dataobj
        dtype = np.dtype(getattr(dataobj, "dtype", self.img.get_data_dtype()))
        offset, need = int(getattr(dataobj, "offset", 0)), math.prod(self.shape) * dtype.itemsize
        if str(self.path).lower().endswith(".gz"):
            held = gzip_holds(self.path, offset + need) - offset
        else:
            held = self.path.stat().st_size - offset
        if held < need:
            plane = need // self.nz
            raise DataError(f"declares {self.nz} slices ({mib(need)} of {dtype} voxels from byte {offset:,}) but holds "
                            f"{mib(max(0, held))}, {max(0, held) // plane} whole slices: the file is truncated or its "
                            "header is wrong; refused whole", self.path)

    def index(self, k: int) -> int:
        """Array index along z of the k-th slice from inferior to superior."""
        return k if self.flips[2] > 0 else self.nz - 1 - k

    def z_mm(self, k: int) -> float:
        """Patient z (mm, RAS+) of the centre of slice k."""
        voxel = np.array([(n - 1) / 2.0 for n in self.shape] + [1.0])
        voxel[self.axes[2]] = self.index(k)
        return round(float((np.asarray(self.img.affine, dtype=np.float64) @ voxel)[2]), 4)

    def plane(self, k: int) -> tuple[np.ndarray, float, float]:
        """Slice k as stored [H, W] shown like an axial DICOM slice (anterior up, patient right on the
        left), with the (slope, intercept) that make its values HU."""
        ndim = len(self.img.shape)
        slicer: list[Any] = [slice(None)] * ndim
        if self.axes[2] < ndim:
            slicer[self.axes[2]] = self.index(k)
        for extra in range(3, ndim):
            slicer[extra] = 0
        arr, slope, inter = self._data(tuple(slicer))
        xa, ya = self.axes[0], self.axes[1]
        if arr.ndim != 2:
            raise DataError(f"expected a 2-D slice, found shape {arr.shape}", self.path)
        if xa > ya:
            arr = arr.T  # arr[x, y]
        if self.flips[0] < 0:
            arr = arr[::-1, :]
        if self.flips[1] < 0:
            arr = arr[:, ::-1]
        return arr[::-1, ::-1].T, slope, inter  # rows: anterior -> posterior, columns: right -> left

    def _data(self, slicer: tuple) -> tuple[np.ndarray, float, float]:
        """(voxels of ``slicer``, slope, intercept). A ``.nii`` is read by nibabel (the slice only,
        scaled); a ``.nii.gz`` through a :class:`GzipCursor` (the slice's bytes only, inflating
        the file once while its slices are read in turn; a volume whose axial axis is not the last
        is at most :data:`MAX_SLICE_BYTES` and is kept whole while its slices are read)."""
        dataobj = self.img.dataobj
        if not str(self.path).lower().endswith(".gz") or not hasattr(dataobj, "slope"):
            return dataobj[slicer], 1.0, 0.0
        dtype, offset = np.dtype(dataobj.dtype), int(dataobj.offset)
        shape = tuple(int(v) for v in self.img.shape)
        keep = self.nz > 1
        z_axis = self.axes[2]
        if len(shape) == 2 or z_axis == 2:  # one contiguous block (Fortran order)
            nbytes = shape[0] * shape[1] * dtype.itemsize
            index = slicer[2] if len(shape) > 2 else 0
            cursor = _gz_cursor(self.path, keep, max(nbytes, nbytes * self.nz // 256))
            try:
                raw = np.frombuffer(cursor.read_at(offset + index * nbytes, nbytes), dtype)
            finally:
                if not keep:
                    cursor.close()
            raw = raw.reshape(shape[:2], order="F")
        else:
            volume = self._whole(dtype, offset, shape, keep)
            raw = volume[slicer]
        return raw, float(dataobj.slope), float(dataobj.inter)

    def _whole(self, dtype: np.dtype, offset: int, shape: tuple[int, ...], keep: bool) -> np.ndarray:
        key = _file_key(self.path)
        kept = getattr(_LOCAL, "volume", None)
        if kept is not None and kept[0] == key:
            return kept[1]
        _LOCAL.volume = None
        cursor = GzipCursor(self.path)
        try:
            volume = np.frombuffer(cursor.read_at(offset, math.prod(shape) * dtype.itemsize), dtype)
        finally:
            cursor.close()
        volume = volume.reshape(shape, order="F")
        if keep:
            _LOCAL.volume = (key, volume)
        return volume

    def rendered(self, k: int, window: tuple[float, float]) -> np.ndarray:
        """Slice k rendered with ``window`` (float32 [H, W], as :func:`render_hu` of its HU), converted
        a band of rows at a time: memory is the stored slice plus the float32 result.

        Raises:
            DataError: the slice holds voxels that are not finite numbers.
        """
        raw, slope, inter = self.plane(k)
        out = np.empty(raw.shape, dtype=np.float32)
        rows = max(1, (16 * MiB) // max(1, raw.shape[1] * 8))
        bad = 0
        for r in range(0, raw.shape[0], rows):
            hu = np.asarray(raw[r : r + rows], dtype=np.float64)
            if (slope, inter) != (1.0, 0.0):
                hu = hu * slope + inter
            finite = np.isfinite(hu)
            if not finite.all():
                bad += int((~finite).sum())
                continue
            out[r : r + rows] = render_hu(hu, window)
        if bad:
            raise DataError(f"slice {k} holds {bad} voxels that are not finite numbers", self.path)
        return out

    def spacing(self) -> list[float]:
        zooms = np.sqrt((np.asarray(self.img.affine, dtype=np.float64)[:3, :3] ** 2).sum(0))
        return [round(float(zooms[self.axes[1]]), 6), round(float(zooms[self.axes[0]]), 6)]


def _read_nifti(path: Path, frame: int | None, window: tuple[float, float]) -> tuple[np.ndarray, str, dict]:
    vol = _NiftiVolume.open(path)
    if frame is None:
        raise DataError(f"is a NIfTI volume ({vol.nz} slices); this reads one 2-D slice: give the file to "
                        "`ctmask infer`, which predicts every slice", path)
    if not 0 <= frame < vol.nz:
        raise DataError(f"has {vol.nz} axial slices; slice {frame} was asked for", path)
    notes = list(vol.notes)
    try:
        with _captured(notes):
            pixels = vol.rendered(frame, window)
            codes = "".join(_nibabel(path).orientations.aff2axcodes(vol.img.affine))
            zooms = np.sqrt((np.asarray(vol.img.affine, dtype=np.float64)[:3, :3] ** 2).sum(0))
    except DataError:
        raise
    except Exception as exc:  # truncated data, short reads, bad compression...
        raise DataError(_error("cannot read NIfTI slice", exc), path) from None
    info: dict[str, Any] = {"assumed": "HU", "orientation": codes, "slices": vol.nz, "z_mm": vol.z_mm(frame),
                            "pixel_spacing_mm": vol.spacing(), "slice_spacing_mm": round(float(zooms[vol.axes[2]]), 6),
                            "display": "canonical RAS+ [x, y] -> rows anterior to posterior, columns right to left"}
    if notes:
        info["warnings"] = notes
    return pixels, "nifti-hu", info
