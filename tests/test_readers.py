"""Readers of real scans (ctmask.scans): DICOM series and multi-frame, NIfTI, raster images,
and every malformed input a per-file failure, never a crash."""

from __future__ import annotations

import gzip
import io
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests_helpers import write_ct_dicom

from ctmask.core.errors import CtmaskWarning, DataError
from ctmask.core.preprocess import LUNG_WINDOW, window_hu
from ctmask.scans.decode import read_slice
from ctmask.scans.listing import collect_sources
from ctmask.scans.types import Failure

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
WIDE = (0.0, 8000.0)
"""A window that maps [-4000, 4000] HU to [0, 1]: the decoded pixels give the HU back."""


def hu_of(decoded) -> np.ndarray:
    """The HU a slice decoded with :data:`WIDE` holds (float32 pixels: to ~1e-3 HU)."""
    return decoded.pixels.astype(np.float64) * WIDE[1] + (WIDE[0] - WIDE[1] / 2)


def decode_all(inputs, window=WIDE, force_modality=False, **kw):
    """collect_sources + read_slice for every slice, as ``ctmask infer`` does: (decoded, failures)."""
    refs, failures = collect_sources(inputs, force_modality=force_modality)
    decoded = []
    for ref in refs:
        try:
            decoded.append(read_slice(ref, window=window, force_modality=force_modality, **kw))
        except DataError as exc:
            failures.append(Failure(ref.key, exc.message))
    return decoded, failures


def write_dicom(path, stored, *, modality="CT", sop_class=CT_IMAGE, rescale=(1.0, -1024.0), study=None, series=None,
                ipp=None, iop=(1, 0, 0, 0, 1, 0), instance=None, photometric="MONOCHROME2", bits_stored=None,
                meta=True, padding=None, padding_limit=None, excess=b"", spacing=(0.7, 0.7)):
    """A single-frame DICOM holding ``stored`` (uint8, uint16 or int16 [H, W], or uint8 [H, W, 3] RGB).

    ``rescale`` None leaves RescaleSlope / RescaleIntercept out; ``meta`` False writes neither
    preamble nor file meta (implicit VR little endian, as some PACS exports do); ``excess``
    bytes are appended to the pixel data.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    stored = np.asarray(stored)
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.Modality = modality
    for keyword, value in (("StudyInstanceUID", study), ("SeriesInstanceUID", series), ("InstanceNumber", instance),
                           ("ImagePositionPatient", None if ipp is None else [float(v) for v in ipp]),
                           ("ImageOrientationPatient", None if iop is None else [float(v) for v in iop])):
        if value is not None:
            setattr(ds, keyword, value)
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.PixelSpacing = list(spacing)
    ds.Rows, ds.Columns = stored.shape[:2]
    ds.SamplesPerPixel = 3 if stored.ndim == 3 else 1
    if stored.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = "RGB" if stored.ndim == 3 else photometric
    bits = stored.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored = bits, bits_stored or bits
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, int(stored.dtype.kind == "i")
    if padding is not None:
        ds.PixelPaddingValue = padding
    if padding_limit is not None:
        ds.PixelPaddingRangeLimit = padding_limit
    ds.PixelData = stored.tobytes() + excess
    if meta:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, implicit_vr=True, little_endian=True)
    return Path(path)


def write_enhanced_ct(path, stored, zs, rescales, study="1.2.3", series="1.2.3.4", shared_rescale=None):
    """An enhanced (multi-frame) CT: int16 frames [n, H, W], per-frame positions (z) and rescales
    (slope, intercept) in the functional groups; ``shared_rescale`` puts one in the shared groups instead."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def item(**kw):
        d = Dataset()
        for k, v in kw.items():
            setattr(d, k, v)
        return d

    stored = np.asarray(stored, np.int16)
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = ENHANCED_CT, generate_uid(), "CT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.NumberOfFrames = len(stored)
    ds.Rows, ds.Columns = stored.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    shared = item(PlaneOrientationSequence=Sequence([item(ImageOrientationPatient=[1.0, 0, 0, 0, 1.0, 0])]),
                  PixelMeasuresSequence=Sequence([item(PixelSpacing=[0.6, 0.6], SliceThickness=2.0)]))
    if shared_rescale is not None:
        shared.PixelValueTransformationSequence = Sequence([item(RescaleSlope=shared_rescale[0],
                                                                 RescaleIntercept=shared_rescale[1],
                                                                 RescaleType="HU")])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k, z in enumerate(zs):
        fg = item(PlanePositionSequence=Sequence([item(ImagePositionPatient=[-100.0, -120.0, float(z)])]))
        if rescales is not None:
            slope, intercept = rescales[k]
            fg.PixelValueTransformationSequence = Sequence([item(RescaleSlope=slope, RescaleIntercept=intercept,
                                                                 RescaleType="HU")])
        per_frame.append(fg)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = stored.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ENHANCED_CT, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return Path(path)


def write_sr(path):
    """A DICOM object without an image (a Basic Text SR), as PACS exports hold next to the slices."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = BASIC_TEXT_SR, generate_uid(), "SR"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = BASIC_TEXT_SR, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return Path(path)


def ramp_hu(shape=(40, 48), lo=-1000.0, hi=400.0) -> np.ndarray:
    """A smooth HU image with every row and column different."""
    h, w = shape
    y, x = np.mgrid[0:h, 0:w]
    return np.round(lo + (hi - lo) * (x + 3 * y) / (w - 1 + 3 * (h - 1)))


# ---------------------------------------------------------------- DICOM


def test_pydicom_ct_slice_hu_follow_its_tags():
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    refs, failures = collect_sources([path])
    assert failures == [] and len(refs) == 1
    ref = refs[0]
    assert ref.study == ds.StudyInstanceUID and ref.series == ds.SeriesInstanceUID and ref.frame is None
    assert ref.position == pytest.approx(float(ds.ImagePositionPatient[2]))  # axial: the normal is z
    d = read_slice(ref, window=WIDE)
    assert d.kind == "dicom-hu" and d.pixels.dtype == np.float32 and d.pixels.shape == (ds.Rows, ds.Columns)
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    stored = ds.pixel_array
    hu = hu_of(d)
    for r, c in ((0, 0), (10, 100), (64, 64), (127, 5), tuple(np.unravel_index(stored.argmax(), stored.shape))):
        assert hu[r, c] == pytest.approx(stored[r, c] * slope + intercept, abs=0.01)
    assert d.info["rescale"] == {"slope": slope, "intercept": intercept} and d.info["modality"] == "CT"
    assert d.info["pixel_spacing_mm"] == pytest.approx([float(v) for v in ds.PixelSpacing])
    np.testing.assert_allclose(read_slice(ref).pixels, window_hu(stored * slope + intercept), atol=1e-6)


def test_series_in_files_without_suffix_are_ordered_by_position_not_by_name(tmp_path):
    """PACS export: IM0001.. without suffix, names shuffled against positions, a tilted gantry
    (positions projected on the slice normal), a README, a DICOMDIR and a report skipped."""
    folder = tmp_path / "series_dir"
    folder.mkdir()
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    iop = (1, 0, 0, 0, c, s)  # rows tilted about x: normal = (0, -s, c)
    normal = np.cross([1, 0, 0], [0, c, s])
    heights = [12.5, -5.0, 30.0, 0.0, 7.5, 20.0]  # along the normal; file i holds heights[i]
    for i, h in enumerate(heights):
        ipp = np.array([-80.0, 10.0, 3.0]) + h * normal
        write_dicom(folder / f"IM{i + 1:04d}", np.full((40, 40), int(h * 10) + 1024, np.uint16), study="1.9",
                    series="1.9.1", ipp=ipp, iop=iop, instance=len(heights) - i)
    (folder / "README.txt").write_text("exported by the PACS\n")
    write_sr(folder / "SR0001")
    write_sr(folder / "DICOMDIR")
    decoded, failures = decode_all([folder])
    assert failures == []
    order = np.argsort(heights)
    assert [d.ref.label for d in decoded] == [f"series_dir/IM{i + 1:04d}" for i in order]
    base = float(np.dot([-80.0, 10.0, 3.0], normal))
    assert [d.ref.position for d in decoded] == pytest.approx([base + h for h in sorted(heights)])
    assert {d.ref.series for d in decoded} == {"1.9.1"} and {d.ref.study for d in decoded} == {"1.9"}
    medians = [float(np.median(hu_of(d))) for d in decoded]
    assert medians == pytest.approx([int(h * 10) for h in sorted(heights)], abs=0.01)


def test_instance_number_then_file_name_order_slices_without_positions(tmp_path):
    (tmp_path / "a").mkdir()
    for i, inst in enumerate([3, 1, 2]):
        write_dicom(tmp_path / "a" / f"{i}.dcm", np.zeros((32, 32), np.uint16), series="2.1", instance=inst, iop=None)
    refs, failures = collect_sources([tmp_path / "a"])
    assert failures == [] and [r.label for r in refs] == ["a/1.dcm", "a/2.dcm", "a/0.dcm"]
    assert [r.position for r in refs] == [1.0, 2.0, 3.0]
    # One slice without InstanceNumber: file names decide, and there is no position.
    write_dicom(tmp_path / "a" / "3.dcm", np.zeros((32, 32), np.uint16), series="2.1", iop=None)
    refs, _ = collect_sources([tmp_path / "a"])
    assert [r.label for r in refs] == ["a/0.dcm", "a/1.dcm", "a/2.dcm", "a/3.dcm"]
    assert {r.position for r in refs} == {None}


def test_series_are_grouped_apart_and_studies_kept(tmp_path):
    """Interleaved files of three series (two studies), plus a loose PNG: each series comes whole,
    where its first file is, in position order."""
    z = {"1.1": [5, 1, 3], "1.2": [2, 0], "1.3": [9, 8]}
    names = ["f1", "f2", "f3", "f4", "f5", "f6", "f7"]
    plan = [("1.1", 0), ("1.2", 0), ("1.1", 1), ("1.3", 0), ("1.2", 1), ("1.1", 2), ("1.3", 1)]
    for name, (series, k) in zip(names, plan):
        study = "2.2" if series == "1.3" else "2.1"
        write_dicom(tmp_path / name, np.zeros((32, 32), np.uint16), study=study, series=series,
                    ipp=(0, 0, z[series][k]))
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "f35.png")
    refs, failures = collect_sources([tmp_path])
    assert failures == []
    assert [(r.series, r.position) for r in refs] == [("1.1", 1), ("1.1", 3), ("1.1", 5), ("1.2", 0), ("1.2", 2),
                                                      (str(tmp_path / "f35.png"), None), ("1.3", 8), ("1.3", 9)]
    assert [r.study for r in refs if r.series.startswith("1.")] == ["2.1"] * 5 + ["2.2"] * 2
    # The same series given as two folders is still one series; a file given twice comes once.
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    write_dicom(tmp_path / "x" / "a.dcm", np.zeros((32, 32), np.uint16), series="1.9", ipp=(0, 0, 4))
    write_dicom(tmp_path / "y" / "b.dcm", np.zeros((32, 32), np.uint16), series="1.9", ipp=(0, 0, -4))
    refs, _ = collect_sources([tmp_path / "x", tmp_path / "y", tmp_path / "x" / "a.dcm"])
    assert [r.label for r in refs] == ["y/b.dcm", "x/a.dcm"]


def test_slices_at_one_position_are_kept_with_a_warning(tmp_path):
    for name in ("a.dcm", "b.dcm", "c.dcm"):
        write_dicom(tmp_path / name, np.zeros((32, 32), np.uint16), series="5.5", ipp=(0, 0, int(name == "c.dcm")))
    with pytest.warns(CtmaskWarning, match="1 of its 3 slices share their position") as rec:
        refs, failures = collect_sources([tmp_path])
    assert len(rec) == 1 and "all are kept" in str(rec[0].message)
    assert failures == [] and len(refs) == 3


def test_enhanced_multiframe_ct_frames_ordered_with_their_own_rescale(tmp_path):
    rng = np.random.default_rng(0)
    zs = [10.0, -2.5, 5.0, 0.0]  # stored order, shuffled
    rescales = [(1.0, -1024.0), (2.0, -2048.0), (0.5, -1000.0), (1.0, 0.0)]
    hu = [np.round(rng.uniform(-1000, 500, (40, 44))) for _ in zs]
    stored = [np.round((h - i) / s) for h, (s, i) in zip(hu, rescales)]
    path = write_enhanced_ct(tmp_path / "enhanced.dcm", stored, zs, rescales)
    decoded, failures = decode_all([path])
    assert failures == []
    assert [d.ref.frame for d in decoded] == [1, 3, 2, 0]
    assert [d.ref.position for d in decoded] == pytest.approx(sorted(zs))
    assert [d.ref.label for d in decoded] == [f"enhanced.dcm[frame={k}]" for k in (1, 3, 2, 0)]
    for d in decoded:
        k = d.ref.frame
        s, i = rescales[k]
        assert d.kind == "dicom-hu" and d.info["frames"] == 4 and d.info["rescale"] == {"slope": s, "intercept": i}
        np.testing.assert_allclose(hu_of(d), stored[k] * s + i, atol=0.01)
        assert d.info["pixel_spacing_mm"] == [0.6, 0.6]
    # A rescale in the shared functional groups serves every frame.
    shared = write_enhanced_ct(tmp_path / "shared.dcm", stored[:2], zs[:2], None, series="7.7",
                               shared_rescale=(1.0, -1024.0))
    d = decode_all([shared])[0][0]
    np.testing.assert_allclose(hu_of(d), stored[1] - 1024.0, atol=0.01)
    # read_slice of a path (training) reads one 2-D slice: a multi-frame file is an error that says what to use.
    with pytest.raises(DataError, match="multi-frame DICOM .4 frames.*ctmask infer"):
        read_slice(path)


# ---------------------------------------------------------------- NIfTI


def nifti(path, data, affine):
    import nibabel as nib

    nib.Nifti1Image(np.asarray(data), np.asarray(affine, float)).to_filename(str(path))
    return Path(path)


@pytest.mark.parametrize("layout", ["ras", "lps-flipped", "permuted"])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_slices_ordered_by_z_and_shown_like_dicom(tmp_path, layout, suffix):
    """Whatever the array layout, slice k is the k-th from inferior to superior, shown with anterior
    up and the patient's right on the image's left; values are HU; z and spacing from the affine."""
    import nibabel as nib

    rng = np.random.default_rng(1)
    nx, ny, nz = 40, 48, 5
    canon = np.round(rng.uniform(-1000, 1000, (nx, ny, nz))).astype(np.int16)  # [x: R, y: A, z: S]
    canon[nx - 1, ny - 1, :] = 3000  # the most right, most anterior voxel of every slice
    ras = np.array([[0.7, 0, 0, -14], [0, 0.8, 0, -20], [0, 0, 2.5, -50], [0, 0, 0, 1]])
    if layout == "ras":
        data, affine = canon, ras
    elif layout == "lps-flipped":  # every axis reversed (x to the left, y posterior, z inferior)
        data = canon[::-1, ::-1, ::-1]
        flip = np.diag([-1.0, -1.0, -1.0, 1.0])
        flip[:3, 3] = [nx - 1, ny - 1, nz - 1]
        affine = ras @ flip
    else:  # array axes (z, x reversed, y)
        data = np.transpose(canon[::-1, :, :], (2, 0, 1))
        perm = np.zeros((4, 4))
        perm[0, 1], perm[0, 3], perm[1, 2], perm[2, 0], perm[3, 3] = -1.0, nx - 1, 1.0, 1.0, 1.0
        affine = ras @ perm
    path = nifti(tmp_path / f"ct{suffix}", data, affine)
    assert np.array_equal(nib.as_closest_canonical(nib.load(str(path))).get_fdata(), canon)  # the test's own check
    decoded, failures = decode_all([path])
    assert failures == [] and len(decoded) == nz
    assert [d.ref.frame for d in decoded] == list(range(nz))
    assert [d.ref.label for d in decoded] == [f"ct{suffix}[z={k}]" for k in range(nz)]
    assert [d.ref.position for d in decoded] == pytest.approx([-50 + 2.5 * k for k in range(nz)])
    assert {d.ref.study for d in decoded} == {d.ref.series for d in decoded} == {str(path)}
    for k, d in enumerate(decoded):
        assert d.kind == "nifti-hu" and d.info["assumed"] == "HU" and d.pixels.shape == (ny, nx)
        np.testing.assert_allclose(hu_of(d), canon[:, :, k][::-1, ::-1].T, atol=0.01)
        assert hu_of(d)[0, 0] == pytest.approx(3000, abs=0.01)  # anterior up, patient right on the left
        assert d.info["pixel_spacing_mm"] == pytest.approx([0.8, 0.7]) and d.info["slice_spacing_mm"] == 2.5
    with pytest.raises(DataError, match="NIfTI volume .5 slices.*ctmask infer"):
        read_slice(path)


def test_nifti_refusals(tmp_path):
    eye = np.eye(4)
    four_d = nifti(tmp_path / "fmri.nii", np.zeros((40, 40, 3, 2), np.int16), eye)
    one_volume = nifti(tmp_path / "one.nii", np.zeros((40, 40, 3, 1), np.int16), eye)
    nan = np.zeros((40, 40, 2), np.float32)
    nan[3, 3, 1] = np.nan
    nan_path = nifti(tmp_path / "nan.nii", nan, eye)
    small = nifti(tmp_path / "small.nii", np.zeros((8, 8, 3), np.int16), eye)
    decoded, failures = decode_all([four_d, one_volume, nan_path, small])
    reasons = {Path(f.file.split("#")[0]).name: f.reason for f in failures}
    assert "2 volumes" in reasons["fmri.nii"] and "one 3-D CT volume" in reasons["fmri.nii"]
    assert "not finite" in reasons["nan.nii"] and "less than the minimum" in reasons["small.nii"]
    assert sorted((Path(d.ref.path).name, d.ref.frame) for d in decoded) == [
        ("nan.nii", 0), ("one.nii", 0), ("one.nii", 1), ("one.nii", 2)]


def test_readers_import_without_nibabel_until_a_nifti_is_read(tmp_path):
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "a.png")
    nifti(tmp_path / "v.nii", np.zeros((32, 32, 2), np.int16), np.eye(4))
    code = (
        "import sys; sys.modules['nibabel'] = None\n"
        "from ctmask.scans.decode import read_slice\nfrom ctmask.scans.listing import collect_sources\n"
        f"refs, failures = collect_sources([{str(tmp_path)!r}])\n"
        "print(read_slice(refs[0]).kind, [f.reason for f in failures])\n"
        "print('nibabel' in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["image-8bit ['reading NIfTI needs nibabel: pip install nibabel']", "False"]


# ---------------------------------------------------------------- raster images


def test_16bit_images_hold_hu_plus_1024_never_scaled_by_their_content(tmp_path):
    """Finding: a 16-bit PNG with max 255 and the same with one pixel at 256 gave inputs 250x apart."""
    a = (np.arange(40 * 40) % 256).reshape(40, 40).astype(np.uint16)
    b = a.copy()
    b[0, 0] = 256
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(b).save(tmp_path / "b.png")
    (da, db), failures = decode_all([tmp_path / "a.png", tmp_path / "b.png"], window=LUNG_WINDOW)
    assert failures == [] and da.kind == db.kind == "image-16bit-hu+1024"
    same = a == b
    np.testing.assert_array_equal(da.pixels[same], db.pixels[same])
    # Finding: a CT stored as HU + 1024 came out nearly black; it renders like the DICOM of the same HU.
    hu = ramp_hu((64, 72), -1024, 1500)
    Image.fromarray((hu + 1024).astype(np.uint16)).save(tmp_path / "ct16.png")
    write_ct_dicom(tmp_path / "ct.dcm", hu)
    (png, dcm), failures = decode_all([tmp_path / "ct16.png", tmp_path / "ct.dcm"], window=LUNG_WINDOW)
    assert failures == [] and png.kind == "image-16bit-hu+1024" and dcm.kind == "dicom-hu"
    np.testing.assert_allclose(png.pixels, dcm.pixels, atol=1e-6)
    assert png.pixels.mean() > 0.5  # not nearly black (HU + 1024 scaled by 65535 gave at most 0.04)
    # Another offset is an option, named in the kind.
    other = read_slice(png.ref, window=LUNG_WINDOW, hu_offset=0.0)
    assert other.kind == "image-16bit-hu+0"
    np.testing.assert_allclose(other.pixels, window_hu(hu + 1024), atol=1e-6)


def test_int_and_float_tiffs(tmp_path):
    """Findings: a float32 TIFF in [0, 1] became all black; an int32 TIFF holding HU came out 72% zeros."""
    hu = ramp_hu((50, 60), -1000, 600)
    write_ct_dicom(tmp_path / "ct.dcm", hu)
    unit = np.linspace(0, 1, 50 * 60, dtype=np.float32).reshape(50, 60)
    Image.fromarray(unit).save(tmp_path / "unit.tif")
    Image.fromarray(hu.astype(np.int32)).save(tmp_path / "hu.tif")
    Image.fromarray((hu + 1024).astype(np.int32)).save(tmp_path / "hu1024.tif")
    Image.fromarray(hu.astype(np.float32)).save(tmp_path / "hu_float.tif")
    decoded, failures = decode_all([tmp_path / n for n in ("ct.dcm", "unit.tif", "hu.tif", "hu1024.tif",
                                                           "hu_float.tif")], window=LUNG_WINDOW)
    assert failures == []
    dcm, unit_d, hu_d, hu1024_d, float_d = decoded
    assert unit_d.kind == "image-float-unit"
    np.testing.assert_array_equal(unit_d.pixels, unit)
    assert hu_d.kind == "image-int-hu" and hu1024_d.kind == "image-int-hu+1024" and float_d.kind == "image-float-hu"
    for d in (hu_d, hu1024_d, float_d):
        np.testing.assert_allclose(d.pixels, dcm.pixels, atol=1e-6)
    assert (hu_d.pixels == 0).mean() < 0.05


def test_8bit_colour_palette_and_alpha_images(tmp_path):
    gray = (np.arange(40 * 40) % 256).reshape(40, 40).astype(np.uint8)
    rgb = np.stack([gray, 255 - gray, gray // 2], -1)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.zeros_like(gray)])).save(tmp_path / "rgba.png")  # fully transparent
    Image.fromarray(gray).convert("P").save(tmp_path / "palette.bmp")
    Image.fromarray(gray).save(tmp_path / "gray.jpg", quality=100)
    decoded, failures = decode_all([tmp_path / n for n in ("gray.png", "rgb.png", "rgba.png", "palette.bmp",
                                                           "gray.jpg")])
    assert failures == [] and {d.kind for d in decoded} == {"image-8bit"}
    g, c, ca, p, j = decoded
    np.testing.assert_array_equal(g.pixels, gray / np.float32(255))
    luma = np.asarray(Image.fromarray(rgb).convert("L")) / np.float32(255)
    np.testing.assert_array_equal(c.pixels, luma)
    np.testing.assert_array_equal(ca.pixels, luma)  # alpha ignored
    np.testing.assert_allclose(p.pixels, g.pixels, atol=1 / 255)
    np.testing.assert_allclose(j.pixels, g.pixels, atol=3 / 255)


# ---------------------------------------------------------------- findings


def test_modalities_other_than_ct_are_refused_unless_forced(tmp_path):
    path = write_dicom(tmp_path / "mr.dcm", np.full((40, 40), 300, np.uint16), modality="MR", sop_class=MR_IMAGE,
                       rescale=(1.0, 0.0))
    refs, failures = collect_sources([path])
    assert refs == [] and failures == [
        Failure(str(path), "modality MR: ctmask reads chest CT; pass --force-modality to predict anyway")]
    refs, _ = collect_sources([tmp_path], force_modality=False)
    assert refs == []
    refs, failures = collect_sources([path], force_modality=True)
    assert failures == [] and len(refs) == 1
    with pytest.raises(DataError, match="modality MR"):
        read_slice(refs[0])
    d = read_slice(refs[0], window=WIDE, force_modality=True)
    assert d.kind == "dicom-hu" and d.info["modality"] == "MR" and np.allclose(hu_of(d), 300, atol=0.01)


def test_secondary_capture_8bit_is_a_rendering_not_hu(tmp_path):
    gray = (np.arange(40 * 40) % 256).reshape(40, 40).astype(np.uint8)
    sc = write_dicom(tmp_path / "sc.dcm", gray, modality="OT", sop_class=SECONDARY_CAPTURE, rescale=None)
    as_ct = write_dicom(tmp_path / "sc_ct.dcm", gray, modality="CT", sop_class=SECONDARY_CAPTURE, rescale=None)
    inverted = write_dicom(tmp_path / "mono1.dcm", gray, sop_class=SECONDARY_CAPTURE, rescale=None,
                           photometric="MONOCHROME1")
    rgb = write_dicom(tmp_path / "rgb.dcm", np.stack([gray] * 3, -1), sop_class=SECONDARY_CAPTURE, rescale=None)
    _, failures = decode_all([sc])
    assert "modality OT" in failures[0].reason
    decoded, failures = decode_all([sc, as_ct, inverted, rgb], force_modality=True)
    assert failures == [] and {d.kind for d in decoded} == {"dicom-rendered"}
    by_name = {Path(d.ref.path).name: d for d in decoded}
    for name in ("sc.dcm", "sc_ct.dcm", "rgb.dcm"):
        np.testing.assert_allclose(by_name[name].pixels, gray / 255.0, atol=1e-6)
        assert "not HU" in by_name[name].info["assumed"]
    np.testing.assert_allclose(by_name["mono1.dcm"].pixels, 1 - gray / 255.0, atol=1e-6)
    # With rescale tags an 8-bit image is HU after all.
    hu8 = write_dicom(tmp_path / "hu8.dcm", gray, rescale=(1.0, -100.0))
    d = decode_all([hu8])[0][0]
    assert d.kind == "dicom-hu" and np.allclose(hu_of(d), gray - 100.0, atol=0.01)


def test_modality_lut_sequence_is_applied(tmp_path):
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    stored = (np.arange(40 * 40) % 300).reshape(40, 40).astype(np.uint16)
    path = write_dicom(tmp_path / "lut.dcm", stored, rescale=None)
    ds = pydicom.dcmread(path)
    lut = Dataset()
    lut.LUTDescriptor, lut.ModalityLUTType = [256, 0, 16], "HU"
    lut.LUTData = (4 * np.arange(256, dtype="<u2")).tobytes()
    ds.ModalityLUTSequence = Sequence([lut])
    ds.save_as(path, enforce_file_format=True)
    d = decode_all([path])[0][0]
    assert d.kind == "dicom-hu" and d.info["rescale"] == "Modality LUT Sequence"
    np.testing.assert_allclose(hu_of(d), 4.0 * np.minimum(stored, 255), atol=0.01)


def test_padding_pixels_become_air(tmp_path):
    """Finding: ignoring PixelPaddingValue rendered the outside of the scan circle darker than anything in training."""
    hu = ramp_hu((48, 48), -900, 300).astype(np.int16)
    inside = (np.mgrid[0:48, 0:48] - 23.5) ** 2
    outside = inside.sum(0) > 22**2
    stored = hu.copy()
    stored[outside] = -3024
    path = write_dicom(tmp_path / "pad.dcm", stored, rescale=(1.0, 0.0), padding=-3024)
    d = decode_all([path])[0][0]
    expected = np.where(outside, -1000.0, hu)
    np.testing.assert_allclose(hu_of(d), expected, atol=0.01)
    assert d.info["padding_pixels"] == int(outside.sum())
    # A padding range (PixelPaddingValue .. PixelPaddingRangeLimit), unsigned stored values.
    stored = (hu + 1024).astype(np.uint16)
    stored[outside] = np.where(np.arange(outside.sum()) % 2, 0, 20)
    path = write_dicom(tmp_path / "range.dcm", stored, rescale=(1.0, -1024.0), padding=20, padding_limit=0)
    d = decode_all([path])[0][0]
    np.testing.assert_allclose(hu_of(d), expected, atol=0.01)


def test_dicom_without_file_meta_with_or_without_suffix(tmp_path):
    hu = ramp_hu((40, 40)).astype(np.int16)
    (tmp_path / "exp").mkdir()
    write_dicom(tmp_path / "exp" / "IM0001", hu, rescale=(1.0, 0.0), meta=False, series="8.1", ipp=(0, 0, 1))
    write_dicom(tmp_path / "exp" / "x.dcm", hu, rescale=(1.0, 0.0), meta=False, series="8.1", ipp=(0, 0, 0))
    assert not (tmp_path / "exp" / "IM0001").read_bytes()[128:132] == b"DICM"
    decoded, failures = decode_all([tmp_path / "exp"])
    assert failures == [] and [d.ref.label for d in decoded] == ["exp/x.dcm", "exp/IM0001"]
    for d in decoded:
        assert d.kind == "dicom-hu" and d.info["transfer_syntax"] == "Implicit VR Little Endian"
        np.testing.assert_allclose(hu_of(d), hu, atol=0.01)
    np.testing.assert_allclose(read_slice(tmp_path / "exp" / "IM0001", WIDE).pixels, decoded[1].pixels)


def test_truncated_and_unreadable_files_fail_alone(tmp_path):
    for i in range(4):
        write_ct_dicom(tmp_path / f"s{i}.dcm", np.full((40, 40), -500.0 + i))
    good = (tmp_path / "s1.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(good[:150])
    # An instance of its own (a truncated copy of s1 would be dropped as its copy: the larger file is kept).
    (tmp_path / "cut_pixels.dcm").write_bytes((tmp_path / "s3.dcm").read_bytes()[:-1000])
    (tmp_path / "s3.dcm").unlink()
    (tmp_path / "empty.png").write_bytes(b"")
    decoded, failures = decode_all([tmp_path, tmp_path / "missing.dcm"])
    assert sorted(Path(d.ref.path).name for d in decoded) == ["s0.dcm", "s1.dcm", "s2.dcm"]
    reasons = {Path(f.file).name: f.reason for f in failures}
    assert set(reasons) == {"cut.dcm", "cut_pixels.dcm", "empty.png", "missing.dcm"}
    assert reasons["cut.dcm"].startswith("cannot decode DICOM") and reasons["missing.dcm"] == "no such file or folder"
    assert reasons["empty.png"].startswith("cannot decode image")
    # A named pipe is not opened (that would wait for a writer forever).
    os.mkfifo(tmp_path / "pipe.dcm")
    decoded, failures = decode_all([tmp_path / "pipe.dcm"])
    assert decoded == [] and failures == [Failure(str(tmp_path / "pipe.dcm"), "not a regular file or folder")]
    with pytest.raises(DataError, match="not a regular file"):
        read_slice(tmp_path / "pipe.dcm")
    assert len(decode_all([tmp_path])[0]) == 3


def test_unreadable_file_is_a_failure(tmp_path, monkeypatch):
    locked = tmp_path / "locked.dcm"
    write_ct_dicom(locked, np.zeros((40, 40)))
    if os.geteuid() == 0:  # root reads a chmod 000 file: refuse the open instead
        import ctmask.scans.sniff as sniff

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(args[0]))

        monkeypatch.setattr(sniff, "open", refuse, raising=False)
    locked.chmod(0)
    try:
        decoded, failures = decode_all([locked])
        assert decoded == [] and failures[0].file == str(locked) and "Permission denied" in failures[0].reason
        decoded, failures = decode_all([tmp_path])
        assert decoded == [] and [f.file for f in failures] == [str(locked), str(tmp_path)]
    finally:
        locked.chmod(0o644)


def test_tiny_and_bomb_images_are_refused_without_a_crash(tmp_path):
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(tmp_path / "dot.png")

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                                        + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    header = struct.pack(">IIBBBBB", 9000, 9000, 8, 0, 0, 0, 0)  # below Pillow's own limit, above ctmask's
    (tmp_path / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    decoded, failures = decode_all([tmp_path])
    assert decoded == []
    reasons = {Path(f.file).name: f.reason for f in failures}
    assert "1x1 pixels, less than the minimum" in reasons["dot.png"]
    assert "refused before decoding" in reasons["bomb.png"] and "refused before decoding" in reasons["big.png"]


def test_decoder_warnings_are_kept_not_printed(tmp_path, capfd, caplog):
    """pydicom warns (and logs) about excess pixel bytes: nothing printed, nothing escapes, all in info."""
    path = write_dicom(tmp_path / "excess.dcm", np.zeros((40, 40), np.uint16), excess=b"\0" * 256)
    caplog.set_level("DEBUG")
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        decoded, failures = decode_all([path])
    assert failures == [] and escaped == [] and caplog.records == []
    assert any("excess padding" in w for w in decoded[0].info["warnings"])
    assert capfd.readouterr() == ("", "")


def test_warning_capture_is_per_thread_and_restores_the_global_state(tmp_path):
    import logging
    import threading

    noisy = write_dicom(tmp_path / "excess.dcm", np.zeros((40, 40), np.uint16), excess=b"\0" * 256)
    quiet = write_dicom(tmp_path / "quiet.dcm", np.zeros((40, 40), np.uint16))
    nib_logger = logging.getLogger("nibabel.global")
    before = (warnings.showwarning, list(warnings.filters), nib_logger.handlers[:], nib_logger.propagate)
    results: dict[str, list] = {"excess.dcm": [], "quiet.dcm": []}

    def work(path):
        for _ in range(20):
            refs, _ = collect_sources([path])
            results[path.name].append(read_slice(refs[0]).info.get("warnings"))

    threads = [threading.Thread(target=work, args=(p,)) for p in (noisy, quiet, noisy, quiet)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(w and "excess padding" in w[0] for w in results["excess.dcm"]) and len(results["excess.dcm"]) == 40
    assert results["quiet.dcm"] == [None] * 40
    after = (warnings.showwarning, list(warnings.filters), nib_logger.handlers[:], nib_logger.propagate)
    assert after == before


def test_compressed_dicom_without_its_decoder_names_the_package(tmp_path):
    """A compressed transfer syntax no installed plugin decodes: refused with the package to install.
    (JPEG-LS has a decoder once the dicom extra's highdicom brings pyjpegls; JPEG Lossless, process 14,
    needs pylibjpeg-libjpeg or GDCM, which ctmask does not install. A test that needs neither missing
    skips, saying which is installed.)"""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLossless, JPEGLSLossless

    for ts, name, source in ((JPEGLossless, "JPEG Lossless", None),
                             (JPEGLSLossless, "JPEG-LS Lossless", "MR_small_jpeg_ls_lossless.dcm")):
        if not get_decoder(ts).is_available:
            break
    else:
        pytest.skip("decoders for both JPEG Lossless and JPEG-LS are installed")
    if source is None:  # an MR slice whose one frame is declared JPEG Lossless (bytes of a JPEG start)
        ds = dcmread(get_testdata_file("MR_small.dcm"))
        ds.file_meta.TransferSyntaxUID = ts
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + bytes(60)])
        ds["PixelData"].VR = "OB"
        path = tmp_path / "jpeg_lossless.dcm"
        ds.save_as(path, enforce_file_format=True)
    else:
        path = get_testdata_file(source)
    decoded, failures = decode_all([path], force_modality=True)
    assert decoded == [] and name in failures[0].reason, failures
    assert "no decoder for it is installed; pip install pylibjpeg pylibjpeg-libjpeg" in failures[0].reason


def test_folders_without_slices_and_other_files(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.txt").write_text("nothing here")
    (tmp_path / "docs" / "notes").write_text("no suffix, not DICOM")
    write_sr(tmp_path / "docs" / "report.dcm")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    with pytest.warns(CtmaskWarning, match="ignored 1 non-image DICOM object: SR 1"):
        refs, failures = collect_sources([tmp_path / "docs", tmp_path / "bad"])
    assert [r.path for r in refs] == [str(tmp_path / "bad" / "x.png")]  # images are opened when read
    assert failures == [Failure(str(tmp_path / "docs"), "folder holds no image (.png .jpg .jpeg .tif .tiff .bmp), "
                                                        "DICOM or NIfTI file")]
    # Given by name: a file that is no image says so; a PNG without suffix is read.
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "slice", format="PNG")
    refs, failures = collect_sources([tmp_path / "docs" / "README.txt", tmp_path / "slice",
                                      tmp_path / "docs" / "report.dcm"])
    assert [r.path for r in refs] == [str(tmp_path / "slice")] and read_slice(refs[0]).kind == "image-8bit"
    assert [Path(f.file).name for f in failures] == ["README.txt", "report.dcm"]
    assert "not an image" in failures[0].reason and "no image" in failures[1].reason


def test_non_image_dicom_objects_in_a_folder_are_counted_by_modality(tmp_path):
    """pydicom's RT plans (one truncated, one big-endian without file meta) are skipped in a folder,
    as documented, and counted in one warning a user who pointed at the wrong folder sees."""
    import shutil

    from pydicom.data import get_testdata_file

    for name in ("rtplan.dcm", "rtplan_truncated.dcm", "ExplVR_BigEndNoMeta.dcm", "CT_small.dcm"):
        shutil.copy(get_testdata_file(name), tmp_path / name)
    write_sr(tmp_path / "report.dcm")
    with pytest.warns(CtmaskWarning, match="ignored 4 non-image DICOM objects: RTPLAN 3, SR 1") as rec:
        refs, failures = collect_sources([tmp_path])
    assert len([w for w in rec if "non-image" in str(w.message)]) == 1
    assert [r.label for r in refs] == [f"{tmp_path.name}/CT_small.dcm"] and failures == []


def test_a_duplicated_dicom_instance_is_predicted_once_with_a_warning(tmp_path):
    """The same SOPInstanceUID found twice (a copied file, in another folder or under another name) is
    one instance: the copy is dropped, with a warning naming both; distinct instances at one position stay."""
    import shutil

    (tmp_path / "s").mkdir()
    for z, name in enumerate(("a.dcm", "b.dcm")):
        write_dicom(tmp_path / "s" / name, np.zeros((32, 32), np.uint16), series="7.7", ipp=(0, 0, z))
    (tmp_path / "copy").mkdir()
    shutil.copy(tmp_path / "s" / "a.dcm", tmp_path / "copy" / "a-again.dcm")
    with pytest.warns(CtmaskWarning, match=r"1 DICOM slice\(s\) dropped as copies") as rec:
        refs, failures = collect_sources([tmp_path / "s", tmp_path / "copy"])
    message = next(str(w.message) for w in rec if "copies" in str(w.message))
    assert "copy/a-again.dcm copies s/a.dcm" in message
    assert [r.label for r in refs] == ["s/a.dcm", "s/b.dcm"] and failures == []
    # The copy alone is no duplicate.
    refs, failures = collect_sources([tmp_path / "copy"])
    assert [r.label for r in refs] == ["copy/a-again.dcm"] and failures == []
    # A truncated copy found first is dropped, not the complete file (the larger one is kept).
    (tmp_path / "copy" / "a-again.dcm").write_bytes((tmp_path / "s" / "a.dcm").read_bytes()[:-100])
    with pytest.warns(CtmaskWarning, match="copy/a-again.dcm copies s/a.dcm; the largest file is kept"):
        refs, failures = collect_sources([tmp_path / "copy", tmp_path / "s"])
    assert [r.label for r in refs] == ["s/a.dcm", "s/b.dcm"] and failures == []


def test_nifti_of_unknown_orientation_is_refused_by_a_documented_rule(tmp_path):
    """qform_code and sform_code both 0: nibabel guesses an orientation from the voxel sizes, so the
    slices could be sagittal; refused naming the codes and the fix. Either code set is read."""
    import nibabel as nib

    data = np.zeros((40, 40, 3), np.int16)
    unknown = tmp_path / "unknown.nii"
    nib.Nifti1Image(data, None).to_filename(str(unknown))
    assert int(nib.load(str(unknown)).header["qform_code"]) == int(nib.load(str(unknown)).header["sform_code"]) == 0
    known = []
    for code in ("qform", "sform"):
        img = nib.Nifti1Image(data, None)
        getattr(img, f"set_{code}")(np.diag([0.7, 0.7, 2.5, 1.0]), code=1)
        img.to_filename(str(tmp_path / f"{code}.nii"))
        known.append(tmp_path / f"{code}.nii")
    decoded, failures = decode_all([unknown, *known])
    assert [(f.file, "qform_code and sform_code are both 0" in f.reason) for f in failures] == [(str(unknown), True)]
    assert "set_sform" in failures[0].reason
    assert sorted({Path(d.ref.path).name for d in decoded}) == ["qform.nii", "sform.nii"] and len(decoded) == 6


# ---------------------------------------------------------------- fuzzing

FUZZ_COUNTS: dict[str, int] = {}
SUFFIXES = ["", ".png", ".dcm", ".nii", ".nii.gz", ".tif", ".jpg", ".bmp", ".1", ".txt"]


def seed_files() -> dict[str, bytes]:
    """Small valid files of every kind the readers decode."""
    out: dict[str, bytes] = {}
    rng = np.random.default_rng(3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 36), dtype=np.uint8)).save(buf, format="PNG")
    out["png8"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 3000, (36, 40)).astype(np.uint16)).save(buf, format="PNG")
    out["png16"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(rng.integers(-1000, 1000, (36, 40)).astype(np.int32)).save(buf, format="TIFF")
    out["tif32"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(rng.random((36, 40), dtype=np.float32)).save(buf, format="TIFF")
    out["tiff"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(buf, format="JPEG")
    out["jpg"] = buf.getvalue()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        write_dicom(t / "a.dcm", rng.integers(0, 2000, (40, 36)).astype(np.uint16), series="1", ipp=(0, 0, 1),
                    padding=0)
        write_dicom(t / "b", rng.integers(-1000, 1000, (36, 40)).astype(np.int16), rescale=(1.0, 0.0), meta=False)
        write_enhanced_ct(t / "e.dcm", rng.integers(-1000, 1000, (3, 36, 40)), [2, 0, 1],
                          [(1.0, 0.0), (2.0, -5.0), (1.0, -1024.0)])
        nifti(t / "v.nii", rng.integers(-1000, 1000, (36, 40, 3)).astype(np.int16), np.diag([-1.0, 1.0, -2.5, 1.0]))
        for name, key in (("a.dcm", "dicom"), ("b", "dicom_nometa"), ("e.dcm", "enhanced"), ("v.nii", "nii")):
            out[key] = (t / name).read_bytes()
    out["nii.gz"] = gzip.compress(out["nii"], mtime=0)
    return out


SEEDS = seed_files()
SEED_SUFFIX = {"png8": ".png", "png16": ".png", "tif32": ".tif", "tiff": ".tiff", "jpg": ".jpg", "dicom": ".dcm",
               "dicom_nometa": "", "enhanced": ".dcm", "nii": ".nii", "nii.gz": ".nii.gz"}


def check_one(folder: Path, name: str, data: bytes, counter: str) -> None:
    """Write one file, collect it (by name and by folder) and read its slices: nothing but
    DataError from read_slice, nothing raised from collect_sources, no warning escapes."""
    FUZZ_COUNTS[counter] = FUZZ_COUNTS.get(counter, 0) + 1
    folder.mkdir()
    path = folder / name
    path.write_bytes(data)
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        for inputs in ([path], [folder]):
            refs, failures = collect_sources(inputs)
            assert all(isinstance(f, Failure) and f.reason for f in failures)
            assert refs or failures
            for ref in refs[:3] + refs[-1:]:
                try:
                    d = read_slice(ref)
                except DataError as exc:
                    assert str(path) in str(exc)
                    FUZZ_COUNTS[counter + " refused"] = FUZZ_COUNTS.get(counter + " refused", 0) + 1
                    continue
                FUZZ_COUNTS[counter + " decoded"] = FUZZ_COUNTS.get(counter + " decoded", 0) + 1
                assert d.pixels.dtype == np.float32 and d.pixels.ndim == 2
                assert np.isfinite(d.pixels).all() and d.pixels.min() >= 0 and d.pixels.max() <= 1
    assert [w for w in escaped if not issubclass(w.category, CtmaskWarning)] == []
    path.unlink()
    folder.rmdir()


def run_fuzz(tmp_path, capfd, counter, strategy, build, max_examples):
    from hypothesis import HealthCheck, given, settings

    calls = iter(range(10**9))

    @settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(strategy)
    def run(example):
        name, data = build(example)
        check_one(tmp_path / f"case{next(calls)}", name, data, counter)

    run()
    assert capfd.readouterr() == ("", "")
    print(f"\nfuzz {counter}: {FUZZ_COUNTS[counter]} examples, {FUZZ_COUNTS.get(counter + ' decoded', 0)} slices "
          f"decoded, {FUZZ_COUNTS.get(counter + ' refused', 0)} refused (DataError)")
    assert FUZZ_COUNTS[counter] >= max_examples // 2


def test_fuzz_random_bytes_and_wrong_suffixes(tmp_path, capfd):
    from hypothesis import strategies as st

    prefixes = [b"", b"\x89PNG\r\n\x1a\n", b"\0" * 128 + b"DICM", b"II*\0", b"MM\0*", b"BM", b"\xff\xd8\xff",
                SEEDS["nii"][:348], SEEDS["dicom"][:400]]
    strategy = st.tuples(st.sampled_from(prefixes), st.binary(max_size=600), st.sampled_from(SUFFIXES))
    run_fuzz(tmp_path, capfd, "random", strategy, lambda e: (f"f{e[2]}", e[0] + e[1]), 600)


def test_fuzz_truncated_and_corrupted_valid_files(tmp_path, capfd):
    from hypothesis import strategies as st

    strategy = st.tuples(st.sampled_from(sorted(SEEDS)), st.one_of(st.just(1.0), st.floats(0, 1)), st.booleans(),
                         st.sampled_from(SUFFIXES),
                         st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=6))

    def build(e):
        key, cut, own_suffix, suffix, flips = e
        data = bytearray(SEEDS[key][: int(len(SEEDS[key]) * cut)] if cut < 1 else SEEDS[key])
        for where, value in flips:
            if data:
                data[int(where * len(data))] = value
        return "f" + (SEED_SUFFIX[key] if own_suffix else suffix), bytes(data)

    run_fuzz(tmp_path, capfd, "truncated", strategy, build, 800)


def test_fuzz_huge_declared_sizes(tmp_path, capfd):
    """Headers declaring huge or absurd sizes, with little or broken pixel data behind them."""
    from hypothesis import strategies as st

    def png(w, h, depth_type, body):
        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        depth, ctype = depth_type
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(body)) + chunk(b"IEND", b""))

    def dicom(rows, cols, frames, bits):
        data = bytearray(SEEDS["dicom"])
        for tag, value in ((b"\x28\x00\x10\x00US\x02\x00", rows), (b"\x28\x00\x11\x00US\x02\x00", cols),
                           (b"\x28\x00\x00\x01US\x02\x00", bits)):
            at = data.index(tag) + len(tag)
            data[at:at + 2] = struct.pack("<H", value)
        nf = str(frames).encode()
        nf += b" " * (len(nf) % 2)
        at = data.index(b"\x28\x00\x10\x00")  # NumberOfFrames (0028,0008) IS goes before Rows
        return bytes(data[:at]) + b"\x28\x00\x08\x00IS" + struct.pack("<H", len(nf)) + nf + bytes(data[at:])

    def nii(dims, datatype, gz):
        data = bytearray(SEEDS["nii"])
        data[40:56] = struct.pack("<8h", len(dims), *(list(dims) + [1] * (7 - len(dims))))
        data[70:72] = struct.pack("<h", datatype)
        return gzip.compress(bytes(data), mtime=0) if gz else bytes(data)

    side = st.one_of(st.integers(0, 70), st.integers(0, 2**31 - 1), st.sampled_from([8192, 8193, 30000]))
    side16 = st.one_of(st.integers(0, 70), st.integers(0, 65535), st.sampled_from([8192, 8193]))
    strategy = st.one_of(
        st.tuples(st.just("png"), side, side, st.sampled_from([(8, 0), (16, 0), (8, 2), (1, 0), (16, 4), (8, 3)]),
                  st.binary(max_size=200)),
        st.tuples(st.just("dicom"), side16, side16, st.one_of(st.integers(-5, 10**9), st.just(8192)),
                  st.sampled_from([1, 8, 16, 32, 64, 0, 12])),
        st.tuples(st.just("nii"), st.lists(st.integers(-5, 32767), min_size=1, max_size=7),
                  st.sampled_from([2, 4, 8, 16, 64, 128, 32, 1792, 2304, 0, 999]), st.booleans()),
    )

    def build(e):
        if e[0] == "png":
            return "f.png", png(*e[1:])
        if e[0] == "dicom":
            return "IM0001", dicom(*e[1:])
        return "f.nii.gz" if e[3] else "f.nii", nii(*e[1:])

    run_fuzz(tmp_path, capfd, "huge", strategy, build, 600)
