"""NIfTI volumes read with nibabel, one axial slice at a time.

**NIfTI** (``nifti-hu``): values (after the header's scl_slope / scl_inter) are assumed to
be HU. Slices run along the array axis closest to the patient's z (nibabel's
``io_orientation``; nothing is resampled), ordered inferior to superior: ``frame`` k is the
k-th slice in that order, ``position`` its z in mm. Each slice is flipped to canonical RAS+
axes ``c[x, y]`` (x towards the patient's right, y anterior) and shown as a DICOM axial slice
is: rows anterior to posterior, columns patient right to left: ``display = c[::-1, ::-1].T``.
A 4-D file with more than one volume is refused (which volume is the CT cannot be told), and
so is a file whose qform_code and sform_code are both 0: its orientation is unknown (nibabel
would fall back to one guessed from the voxel sizes), so which axis is the patient's z cannot
be told.

A slice's and the volume's bytes are checked on the header, and a ``.nii.gz`` is read slice
by slice from one stream (:class:`~ctmask.scans.bounded.GzipCursor`), never held whole.
nibabel is imported when a NIfTI file is read.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctmask.core.errors import DataError
from ctmask.core.limits import MAX_NIFTI_HEADER_BYTES, MAX_SLICE_BYTES, MAX_SLICES, MAX_VOLUME_BYTES, MiB, mib
from ctmask.core.preprocess import check_image_size
from ctmask.scans.bounded import GzipCursor, gzip_holds
from ctmask.scans.capture import captured, error_text, file_key
from ctmask.scans.hu import render_hu

_LOCAL = threading.local()  # .gz: the thread's cursor into the volume it reads; .volume: a volume it keeps whole


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
    key = file_key(path)
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
class NiftiVolume:
    """A NIfTI volume's header facts: which array axes are x, y, z in RAS+ and their flips
    (:meth:`open` checks the header against the limits)."""

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
    def open(cls, path: Path) -> NiftiVolume:
        nib = _nibabel(path)
        notes: list[str] = []
        try:
            _nifti_header_check(path)
            with captured(notes):
                img = nib.load(str(path), mmap=False)
                shape = tuple(int(v) for v in img.shape)
                affine = np.asarray(img.affine, dtype=np.float64)
                dtype = np.dtype(img.get_data_dtype())
                codes = [int(img.header.get(k, -1)) for k in ("qform_code", "sform_code")]
        except DataError:
            raise
        except Exception as exc:  # nibabel's ImageFileError, HeaderDataError, struct.error, OSError...
            raise DataError(error_text("cannot read NIfTI", exc), path) from None
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
        key = file_key(self.path)
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


def read_nifti(path: Path, frame: int | None, window: tuple[float, float]) -> tuple[np.ndarray, str, dict]:
    """Decode axial slice ``frame`` of a NIfTI volume as the module doc says: (pixels in [0, 1], kind, info).

    Raises:
        DataError: naming the file, for any problem with it.
    """
    vol = NiftiVolume.open(path)
    if frame is None:
        raise DataError(f"is a NIfTI volume ({vol.nz} slices); this reads one 2-D slice: give the file to "
                        "`ctmask infer`, which predicts every slice", path)
    if not 0 <= frame < vol.nz:
        raise DataError(f"has {vol.nz} axial slices; slice {frame} was asked for", path)
    notes = list(vol.notes)
    try:
        with captured(notes):
            pixels = vol.rendered(frame, window)
            codes = "".join(_nibabel(path).orientations.aff2axcodes(vol.img.affine))
            zooms = np.sqrt((np.asarray(vol.img.affine, dtype=np.float64)[:3, :3] ** 2).sum(0))
    except DataError:
        raise
    except Exception as exc:  # truncated data, short reads, bad compression...
        raise DataError(error_text("cannot read NIfTI slice", exc), path) from None
    info: dict[str, Any] = {"assumed": "HU", "orientation": codes, "slices": vol.nz, "z_mm": vol.z_mm(frame),
                            "pixel_spacing_mm": vol.spacing(), "slice_spacing_mm": round(float(zooms[vol.axes[2]]), 6),
                            "display": "canonical RAS+ [x, y] -> rows anterior to posterior, columns right to left"}
    if notes:
        info["warnings"] = notes
    return pixels, "nifti-hu", info
