"""Decompression bombs: small files that declare (or inflate to) far more than they hold.

Each bomb is generated here (streamed: the test never holds what the bomb inflates to) and
read in a fresh Python process, once through the ``infer`` path (``collect_sources`` then
``load_batch``, what ``predict_sources`` runs on its loader thread) and once through the
Serve request path (``CtmaskModel._decode``, what ``/predict`` runs on a worker thread).
The process's peak resident memory while reading (``ru_maxrss`` after minus before) must stay
under :data:`ctmask.core.limits.PEAK_BYTES_BOUND`.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
ZERO_CHUNK = bytes(16 << 20)


# ---------------------------------------------------------------- bombs


def _ct_dataset(rows: int = 64, cols: int = 64):
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE, generate_uid()
    ds.Modality = "CT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.full((rows, cols), 1024, np.uint16).tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def _encode(ds) -> bytes:
    """``ds`` as explicit VR little endian bytes (no file meta)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _split(ds, tag: int) -> tuple[bytes, bytes]:
    """The encoded elements of ``ds`` before and after ``tag`` (where a hand-made element goes)."""
    from pydicom.dataset import Dataset

    before, after = Dataset(), Dataset()
    for elem in ds:
        (before if elem.tag < tag else after).add(elem)
    return _encode(before), _encode(after)


def _preamble_and_meta(ds, transfer_syntax: str) -> bytes:
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    return bytes(128) + b"DICM" + fp.getvalue()


def write_deflated_bomb(path: Path, tag_bytes: int = 1 << 30, prefix: bytes = b"", meta: bytes | None = None) -> Path:
    """A Deflated Explicit VR DICOM CT slice (64 x 64) holding a private OB tag of ``tag_bytes``
    zeros: ~1 MB on disk per GiB inflated. ``prefix``: bytes the inflated data set starts with;
    ``meta``: preamble and file meta to write instead of the standard ones."""
    ds = _ct_dataset()
    head, tail = _split(ds, 0x00091010)
    creator = struct.pack("<HH2sH", 0x0009, 0x0010, b"LO", 12) + b"CTMASK BOMB "
    private = struct.pack("<HH2sHL", 0x0009, 0x1010, b"OB", 0, tag_bytes)
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with open(path, "wb") as fh:
        fh.write(meta if meta is not None else _preamble_and_meta(ds, DEFLATED))
        fh.write(z.compress(prefix + head + creator + private))
        left = tag_bytes
        while left:
            piece = ZERO_CHUNK if left >= len(ZERO_CHUNK) else bytes(left)
            fh.write(z.compress(piece))
            left -= len(piece)
        fh.write(z.compress(tail) + z.flush())
    return path


def write_sequence_bomb(path: Path, items: int = 300_000) -> Path:
    """A single-frame CT DICOM whose PerFrameFunctionalGroupsSequence holds ``items`` items (each
    with a nested PlanePositionSequence item): ~50 bytes per item on disk."""
    from pydicom.dataset import Dataset

    ds = _ct_dataset()
    ds.NumberOfFrames = 1
    inner = Dataset()
    pos = Dataset()
    pos.ImagePositionPatient = [0, 0, 0]
    inner.PlanePositionSequence = [pos]
    body = _encode(inner)
    item = struct.pack("<HHL", 0xFFFE, 0xE000, len(body)) + body
    head, tail = _split(ds, 0x52009230)
    with open(path, "wb") as fh:
        fh.write(_preamble_and_meta(ds, "1.2.840.10008.1.2.1"))
        fh.write(head + struct.pack("<HH2sHL", 0x5200, 0x9230, b"SQ", 0, 0xFFFFFFFF))
        fh.write(item * items)
        fh.write(struct.pack("<HHL", 0xFFFE, 0xE0DD, 0) + tail)
    return path


def write_nifti_gz(path: Path, shape: tuple[int, ...], dtype, value: float = 0.0, flip_z: bool = False) -> Path:
    """A gzipped NIfTI-1 volume of ``shape`` (x, y, z) filled with ``value``, streamed one z slice at
    a time (the generator never holds the volume)."""
    import nibabel as nib

    dtype = np.dtype(dtype)
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    affine = np.diag([0.7, 0.7, -1.0 if flip_z else 1.0, 1.0])
    hdr.set_qform(affine, code=1)
    hdr.set_sform(affine, code=1)
    hdr["vox_offset"] = 352
    plane = np.full(shape[:2], value, dtype=dtype).tobytes(order="F")
    with gzip.open(path, "wb", compresslevel=6) as fh:
        fh.write(hdr.binaryblock + bytes(4))
        for _ in range(int(np.prod(shape[2:], dtype=np.int64))):
            fh.write(plane)
    return path


# ---------------------------------------------------------------- measuring


MEASURE = r"""
import json, os, resource, sys, time
from pathlib import Path
from types import SimpleNamespace

import nibabel, pydicom, pydicom.pixels  # imported before the baseline: only the reading is measured
from ctmask.core.spec import GraphSpec
from ctmask.scans.batch import ReadOptions, load_batch
from ctmask.scans.listing import collect_sources

mode, path = sys.argv[1], Path(sys.argv[2])
spec = GraphSpec(preset="small", image_size=64, n_rois=4)
if mode == "serve":
    from ctmask.scale.serve_app import CtmaskModel, _Refused
    replica = object.__new__(CtmaskModel.func_or_class)  # the replica's decode state, without a runner
    replica.opts = SimpleNamespace(force_modality=False)
    replica.spec, replica.read_opts = spec, ReadOptions()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
out = {"slices": 0, "failures": []}
if mode == "serve":
    try:
        upload = replica._decode(path)
        out["slices"] = len(upload.loaded.refs)
    except _Refused as exc:
        out["failures"].append([exc.status, exc.reason])
else:
    refs, failures = collect_sources([path])
    out["failures"] += [[f.file, f.reason] for f in failures]
    for i in range(0, len(refs), 8):
        loaded = load_batch(refs[i:i + 8], spec, None, False, ReadOptions())
        out["slices"] += len(loaded.refs)
        out["failures"] += [[f.file, f.reason] for f in loaded.failures]
out["seconds"] = round(time.perf_counter() - t0, 2)
out["peak_bytes"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
upload = loaded = None
out["held_bytes"] = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") - base * 1024
print(json.dumps(out))
"""


def measure(path: Path, mode: str, root: Path | None = None) -> dict:
    """Read ``path`` through ``mode`` (``infer`` or ``serve``) in a fresh process: slices read,
    failures, seconds and peak memory added by the reading (bytes)."""
    root = root or Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), RAY_DISABLE_IMPORT_WARNING="1")
    proc = subprocess.run([sys.executable, "-c", MEASURE, mode, str(path)], capture_output=True, text=True, env=env,
                          cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- tests

REFUSED_PEAK = 64 << 20  # a bomb refused before its memory is spent costs next to nothing


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bombs")
    return {"deflated": write_deflated_bomb(d / "deflated.dcm"),
            "sequence": write_sequence_bomb(d / "sequence.dcm"),
            "nifti_float64": write_nifti_gz(d / "slice.nii.gz", (8192, 8192, 1), np.float64),
            "nifti_largest": write_nifti_gz(d / "largest.nii.gz", (8192, 8192, 1), np.float32, -1000.0)}


@pytest.mark.parametrize("mode", ["infer", "serve"])
@pytest.mark.parametrize("bomb, words", [("deflated", "inflates to more than 256 MiB"),
                                         ("sequence", "more than 131,072 sequence items"),
                                         ("nifti_float64", "holds 512 MiB, more than the limit of 256 MiB")])
def test_bombs_are_refused_before_their_memory_is_spent(bombs, bomb, words, mode):
    from ctmask.core.limits import PEAK_BYTES_BOUND

    out = measure(bombs[bomb], mode)
    assert out["slices"] == 0 and len(out["failures"]) == 1, out
    where, reason = out["failures"][0]
    assert words in reason, out
    assert where == (422 if mode == "serve" else str(bombs[bomb])), out  # the file (or the upload) is named
    assert out["peak_bytes"] < REFUSED_PEAK < PEAK_BYTES_BOUND, out


@pytest.mark.parametrize("mode", ["infer", "serve"])
def test_the_largest_allowed_slice_stays_within_the_bound_and_nothing_stays(bombs, mode):
    """8192 x 8192 float32 from a 250 KB .nii.gz: read, under the bound, and nothing kept after."""
    from ctmask.core.limits import PEAK_BYTES_BOUND

    out = measure(bombs["nifti_largest"], mode)
    assert out["slices"] == 1 and out["failures"] == [], out
    assert out["peak_bytes"] < PEAK_BYTES_BOUND, out
    assert out["held_bytes"] < REFUSED_PEAK, out  # no process-wide cache of the volume


def test_a_bomb_among_good_inputs_fails_alone(bombs, tmp_path):
    from ctmask.scans.decode import read_slice
    from ctmask.scans.listing import collect_sources

    good = write_nifti_gz(tmp_path / "good.nii.gz", (64, 64, 3), np.int16, -500)
    refs, failures = collect_sources([bombs["deflated"], good, bombs["sequence"]])
    assert [r.path for r in refs] == [str(good)] * 3
    assert {f.file for f in failures} == {str(bombs["deflated"]), str(bombs["sequence"])}
    assert all(read_slice(r).pixels.shape == (64, 64) for r in refs)


@pytest.mark.parametrize("flip_z", [False, True])
def test_a_gzipped_volume_is_inflated_about_once_whatever_the_slice_order(tmp_path, flip_z):
    import threading

    from ctmask.scans.decode import read_slice
    from ctmask.scans.listing import collect_sources
    from ctmask.scans.nifti import _LOCAL

    shape = (256, 256, 240)  # 30 MiB of int16, slices of 128 KiB
    path = write_nifti_gz(tmp_path / "v.nii.gz", shape, np.int16, -300, flip_z=flip_z)
    volume = int(np.prod(shape)) * 2
    refs, failures = collect_sources([path])
    assert failures == [] and len(refs) == shape[2]

    def read_all() -> None:
        for ref in refs:
            assert read_slice(ref).pixels.shape == (256, 256)
        inflated.append(_LOCAL.gz[1].inflated)

    inflated: list[int] = []
    worker = threading.Thread(target=read_all)  # the loader thread of `infer`: its cursor goes with it
    worker.start()
    worker.join()
    # forwards: once; backwards (z stored superior to inferior): each checkpoint interval twice
    assert inflated and inflated[0] <= (1 if not flip_z else 2) * volume + (1 << 20), (inflated, volume)


def test_a_deflated_dicom_within_the_limit_still_reads(tmp_path):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from ctmask.scans.decode import read_slice
    from ctmask.scans.listing import collect_sources

    ds = _ct_dataset(48, 40)
    from pydicom.dataset import FileMetaDataset

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CT_IMAGE, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "d.dcm", enforce_file_format=True)
    refs, failures = collect_sources([tmp_path / "d.dcm"])
    assert failures == [] and len(refs) == 1
    assert read_slice(refs[0]).pixels.shape == (48, 40)


# ---------------------------------------------------------------- bypasses of the walk and of the decoders

RLE_LOSSLESS = "1.2.840.10008.1.2.5"


def write_rle_bomb(path: Path, segment_bytes: int = 1 << 30) -> Path:
    """An RLE Lossless CT slice declaring 64 x 64 8-bit pixels whose one segment decodes to
    ``segment_bytes`` (replicate runs of 128 bytes): 16 MB on disk per GiB decoded."""
    ds = _ct_dataset()
    del ds.PixelData
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    frame = struct.pack("<16L", 1, 64, *([0] * 14))
    pix = (struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) + struct.pack("<HHL", 0xFFFE, 0xE000, 0)
           + struct.pack("<HHL", 0xFFFE, 0xE000, len(frame) + segment_bytes // 64))
    with open(path, "wb") as fh:
        fh.write(_preamble_and_meta(ds, RLE_LOSSLESS) + _encode(ds) + pix + frame)
        left = segment_bytes // 64
        while left:
            piece = min(left, len(ZERO_CHUNK))
            fh.write(b"\x81\x00" * (piece // 2))
            left -= piece
        fh.write(struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    return path


def _nested(depth: int) -> bytes:
    """ReferencedImageSequence (explicit VR) nested ``depth`` deep, one item each, undefined lengths."""
    inner = b""
    for _ in range(depth):
        item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + inner + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
        inner = (struct.pack("<HH2sHL", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF) + item
                 + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    return inner


def _implicit(ds) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, ds)
    return fp.getvalue()


def _frame_item(implicit: bool = False) -> bytes:
    from pydicom.dataset import Dataset

    inner, pos = Dataset(), Dataset()
    pos.ImagePositionPatient = [0, 0, 0]
    inner.PlanePositionSequence = [pos]
    body = _implicit(inner) if implicit else _encode(inner)
    return struct.pack("<HHL", 0xFFFE, 0xE000, len(body)) + body


def write_walk_bypass(path: Path, kind: str, items: int = 300_000) -> Path:
    """Bombs that stopped the limits' walk early, pydicom then parsing (inflating) the rest:

    * ``padded_ts``: the deflated bomb whose TransferSyntaxUID is NUL-padded past 64 bytes;
    * ``deep_deflated``: the deflated bomb whose data set starts with sequences nested 65 deep;
    * ``deep_items``: ``items`` frame items after a 65-deep nesting;
    * ``implicit_items``: file meta saying explicit VR, a data set in implicit VR with ``items``
      frame items.
    """
    from pydicom.dataset import Dataset

    ds = _ct_dataset()
    if kind in ("padded_ts", "deep_deflated"):
        meta = _preamble_and_meta(ds, DEFLATED)
        if kind == "padded_ts":
            old = struct.pack("<HH2sH", 2, 0x10, b"UI", 22) + DEFLATED.encode()
            new = struct.pack("<HH2sH", 2, 0x10, b"UI", 82) + DEFLATED.encode() + bytes(60)
            assert old in meta
            meta = meta.replace(old, new)
            length = struct.unpack("<L", meta[140:144])[0]  # (0002,0000) group length, after preamble and its header
            meta = meta[:140] + struct.pack("<L", length + 60) + meta[144:]
        write_deflated_bomb(path, prefix=_nested(65) if kind == "deep_deflated" else b"", meta=meta)
        return path
    ds.NumberOfFrames = 1
    before, after = Dataset(), Dataset()
    for elem in ds:
        (before if elem.tag < 0x52009230 else after).add(elem)
    with open(path, "wb") as fh:
        fh.write(_preamble_and_meta(ds, "1.2.840.10008.1.2.1"))  # explicit VR little endian, says the meta
        if kind == "deep_items":
            fh.write(_nested(65) + _encode(before) + struct.pack("<HH2sHL", 0x5200, 0x9230, b"SQ", 0, 0xFFFFFFFF))
            fh.write(_frame_item() * items)
            fh.write(struct.pack("<HHL", 0xFFFE, 0xE0DD, 0) + _encode(after))
        else:
            fh.write(_implicit(before) + struct.pack("<HHL", 0x5200, 0x9230, 0xFFFFFFFF))
            fh.write(_frame_item(implicit=True) * items)
            fh.write(struct.pack("<HHL", 0xFFFE, 0xE0DD, 0) + _implicit(after))
    return path


def write_un_frames(path: Path, items: int = 300_000) -> Path:
    """A CT whose PerFrameFunctionalGroupsSequence is stored as VR UN of defined length (pydicom
    keeps one of 64 KiB or more as bytes)."""
    ds = _ct_dataset()
    ds.NumberOfFrames = 1
    item = _frame_item(implicit=True)
    head, tail = _split(ds, 0x52009230)
    with open(path, "wb") as fh:
        fh.write(_preamble_and_meta(ds, "1.2.840.10008.1.2.1"))
        fh.write(head + struct.pack("<HH2sHL", 0x5200, 0x9230, b"UN", 0, len(item) * items))
        fh.write(item * items)
        fh.write(tail)
    return path


@pytest.fixture(scope="module")
def bypasses(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bypasses")
    out = {"rle": write_rle_bomb(d / "rle.dcm"), "un_frames": write_un_frames(d / "un.dcm")}
    for kind in ("padded_ts", "deep_deflated", "deep_items", "implicit_items"):
        out[kind] = write_walk_bypass(d / f"{kind}.dcm", kind)
    return out


@pytest.mark.parametrize("mode", ["infer", "serve"])
@pytest.mark.parametrize("bomb, words", [
    ("rle", "an RLE segment decodes to more than the 4,096 bytes of its frame's plane"),
    ("padded_ts", "inflates to more than 256 MiB"),
    ("deep_deflated", "cannot be checked against the input limits: sequences nest more than 64 deep"),
    ("deep_items", "cannot be checked against the input limits: sequences nest more than 64 deep"),
    ("implicit_items", "more than 131,072 sequence items"),
    ("un_frames", "its PerFrameFunctionalGroupsSequence is not a sequence of items but bytes of VR UN"),
])
def test_bypasses_of_the_limits_are_refused_before_their_memory_is_spent(bypasses, bomb, words, mode):
    """Before: RLE 1 GiB decoded (peak 1.07 GB), padded TS and deep deflated 2 GB each, deep and
    implicit items 330 MB and 15 s each, the UN groups an AttributeError."""
    from ctmask.core.limits import PEAK_BYTES_BOUND

    out = measure(bypasses[bomb], mode)
    assert out["slices"] == 0 and len(out["failures"]) == 1, out
    where, reason = out["failures"][0]
    assert words in reason, out
    assert where == (422 if mode == "serve" else str(bypasses[bomb])), out
    assert out["peak_bytes"] < REFUSED_PEAK < PEAK_BYTES_BOUND, out


def test_a_compressed_frame_within_its_declared_size_still_reads(tmp_path):
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless

    from ctmask.scans.decode import read_slice
    from ctmask.scans.listing import collect_sources

    ds = _ct_dataset(48, 40)
    ds.PixelData = (np.arange(48 * 40, dtype=np.uint16).reshape(48, 40) % 700 + 500).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CT_IMAGE, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.compress(RLELossless, encoding_plugin="pydicom")
    ds.save_as(tmp_path / "rle.dcm", enforce_file_format=True)
    refs, failures = collect_sources([tmp_path / "rle.dcm"])
    assert failures == [] and len(refs) == 1
    assert read_slice(refs[0]).pixels.shape == (48, 40)


def test_a_walk_stopped_by_a_truncated_tail_still_reads(tmp_path):
    """Failing closed refuses what the walk cannot check, not a file whose last bytes are cut."""
    from ctmask.scans.bounded import check_dicom_limits

    ds = _ct_dataset()
    data = _preamble_and_meta(ds, "1.2.840.10008.1.2.1") + _encode(ds) + struct.pack("<HH2sHL", 0x0009, 0x1010, b"SQ",
                                                                                    0, 0xFFFFFFFF) + b"\xfe\xff"
    (tmp_path / "cut.dcm").write_bytes(data)
    check_dicom_limits(tmp_path / "cut.dcm")  # no error: pydicom says what is wrong with the file


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_nifti_holding_less_than_its_header_declares_is_one_failure(tmp_path, suffix):
    import nibabel as nib

    from ctmask.scans.listing import collect_sources

    hdr = nib.Nifti1Header()
    hdr.set_data_shape((64, 64, 100))
    hdr.set_data_dtype(np.int16)
    hdr.set_qform(np.diag([0.7, 0.7, 1.0, 1.0]), code=1)
    hdr["vox_offset"] = 352
    data = hdr.binaryblock + bytes(4) + np.full((64, 64), -1000, np.int16).tobytes("F")
    path = tmp_path / f"lying{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    refs, failures = collect_sources([path])
    assert refs == [] and len(failures) == 1, failures
    assert failures[0].file == str(path)
    assert "declares 100 slices" in failures[0].reason and "1 whole slices" in failures[0].reason, failures


def test_a_checkpoint_nested_past_the_limit_is_a_checkpoint_error(tmp_path):
    import torch

    from ctmask.core.errors import CheckpointError
    from ctmask.training.checkpoint import FORMAT, load_checkpoint, weights_digest

    model = {"w": torch.zeros(2)}
    nest: list = []
    cur = nest
    for _ in range(3000):
        cur.append([])
        cur = cur[0]
    blob = {"format": FORMAT, "kind": "classifier", "config": "{}", "epoch": 0, "model": model,
            "weights_sha256": weights_digest(model), "optimizer": {"state": nest},
            "optimizer_sha256": "0" * 64, "content_sha256": "0" * 64}
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # pickling 3,000 levels needs it; loading does not
    try:
        torch.save(blob, tmp_path / "deep.pt")
    finally:
        sys.setrecursionlimit(limit)
    with pytest.raises(CheckpointError, match="optimizer state nests containers more than 32 deep") as err:
        load_checkpoint(tmp_path / "deep.pt")
    assert err.value.path == tmp_path / "deep.pt"


def _implicit_meta(ds, transfer_syntax: str) -> bytes:
    """Preamble and a file meta group written implicit VR (pydicom reads it so: it retries the group
    as implicit VR when its first element's VR is not one)."""
    def element(number: int, value: bytes) -> bytes:
        value += b"\0" * (len(value) % 2)
        return struct.pack("<HHL", 0x0002, number, len(value)) + value

    body = (element(0x0001, b"\0\1") + element(0x0002, ds.SOPClassUID.encode())
            + element(0x0003, ds.SOPInstanceUID.encode()) + element(0x0010, transfer_syntax.encode()))
    return bytes(128) + b"DICM" + element(0x0000, struct.pack("<L", len(body))) + body


def test_a_deflated_bomb_with_an_implicit_vr_file_meta_is_refused(tmp_path):
    """Before: the meta read as explicit VR gave no transfer syntax, the walk never inflated and
    pydicom, reading the meta as implicit VR, inflated the whole bomb."""
    from ctmask.core.errors import DataError
    from ctmask.core.limits import MAX_INFLATED_BYTES, MiB
    from ctmask.scans.bounded import check_dicom_limits

    path = write_deflated_bomb(tmp_path / "implicit_meta.dcm", tag_bytes=MAX_INFLATED_BYTES + MiB,
                               meta=_implicit_meta(_ct_dataset(), DEFLATED))
    with pytest.raises(DataError, match="is a Deflated DICOM that inflates to more than 256 MiB"):
        check_dicom_limits(path)


def test_a_fragment_running_past_the_end_of_the_file_is_refused(tmp_path):
    """A Pixel Data fragment whose length runs past the end of the file, frame items after it
    (pydicom scans the bytes for the delimiter and parses what follows). Before: the walk skipped
    past the end and counted nothing left."""
    from ctmask.core.errors import DataError
    from ctmask.scans.bounded import check_dicom_limits

    ds = _ct_dataset()
    ds.NumberOfFrames = 1
    del ds.PixelData
    pixels = (struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
              + struct.pack("<HHL", 0xFFFE, 0xE000, 0x7FFFFFF0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    frames = (struct.pack("<HH2sHL", 0x5200, 0x9230, b"SQ", 0, 0xFFFFFFFF) + _frame_item() * 3_000
              + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    path = tmp_path / "past_end.dcm"
    path.write_bytes(_preamble_and_meta(ds, "1.2.840.10008.1.2.1") + _encode(ds) + pixels + frames)
    assert path.stat().st_size > 100_000
    with pytest.raises(DataError, match="cannot be checked against the input limits: an element runs past the end "
                                        "of the data"):
        check_dicom_limits(path)
