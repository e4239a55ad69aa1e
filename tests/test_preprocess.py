"""Pre-processing shared by training and runtime: decode, window, crop, resize."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from tests_helpers import write_ct_dicom

from ctmask.core.errors import DataError
from ctmask.core.preprocess import (
    LUNG_WINDOW,
    MAX_IMAGE_SIDE,
    MIN_IMAGE_SIDE,
    crop_box,
    resize,
    window_hu,
)
from ctmask.scans.batch import load_slice
from ctmask.scans.decode import read_slice


def declared_png(path, width, height):
    """A tiny PNG whose header declares ``width`` x ``height`` (its pixel data is empty)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    return path


def dicom_with_rescale(path, slope="1", intercept="-1024", hu=None):
    """A CT DICOM whose RescaleSlope / RescaleIntercept are the raw strings given (any text)."""
    write_ct_dicom(path, np.zeros((40, 40), np.float32) if hu is None else hu)
    data = path.read_bytes()
    # Replace the encoded DS values byte for byte (same padded length), bypassing pydicom's checks.
    for old, new in ((b"1.0 ", slope), (b"-1024.0 ", intercept)):
        assert data.count(old) == 1, old
        new = new.encode().ljust(len(old))
        assert len(new) == len(old), new
        data = data.replace(old, new)
    path.write_bytes(data)
    return path


def write_bad_slices(folder):
    """One file per decoding failure: {path: words its error must contain}."""
    folder.mkdir(parents=True, exist_ok=True)
    bad = {
        declared_png(folder / "bomb.png", 20000, 20000): "refused before decoding",
        declared_png(folder / "wide.png", MAX_IMAGE_SIDE + 1, 64): f"{MAX_IMAGE_SIDE + 1}x64",
        dicom_with_rescale(folder / "badslope.dcm", slope="xxxx"): "RescaleSlope 'xxxx' is not a number",
        dicom_with_rescale(folder / "nanslope.dcm", slope="nan"): "RescaleSlope is 'nan'",
        dicom_with_rescale(folder / "infintercept.dcm", intercept="-inf"): "RescaleIntercept is '-inf'",
        dicom_with_rescale(folder / "hugeslope.dcm", slope="9e38"): "not finite",
    }
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(folder / "dot.png")
    bad[folder / "dot.png"] = "1x1 pixels, less than the minimum"
    nan = np.full((40, 40), 0.5, np.float32)
    nan[3, 4] = np.nan
    Image.fromarray(nan).save(folder / "nan.tif")
    bad[folder / "nan.tif"] = "not finite"
    return bad


def test_window_maps_lung_window_to_unit_range():
    level, width = LUNG_WINDOW
    hu = np.array([-2000, level - width / 2, level, level + width / 2, 3000], dtype=np.float32)
    np.testing.assert_allclose(window_hu(hu), [0, 0, 0.5, 1, 1], atol=1e-6)


def test_png_8_and_16_bit(tmp_path):
    a8 = np.arange(1024, dtype=np.uint8).reshape(32, 32)
    Image.fromarray(a8).save(tmp_path / "a.png")
    np.testing.assert_allclose(read_slice(tmp_path / "a.png").pixels, a8 / 255.0, atol=1e-6)
    # 16-bit: HU + 1024 (never scaled by the image's own range), rendered with the window.
    a16 = (np.arange(1024, dtype=np.uint16) * 64).reshape(32, 32)
    Image.fromarray(a16).save(tmp_path / "b.png")
    np.testing.assert_allclose(read_slice(tmp_path / "b.png").pixels, window_hu(a16 - 1024.0), atol=1e-6)


def test_dicom_is_converted_to_hu_and_windowed(tmp_path):
    hu = np.kron(np.array([[-1000.0, -600.0], [40.0, 400.0]], dtype=np.float32), np.ones((16, 16), np.float32))
    write_ct_dicom(tmp_path / "s.dcm", hu)
    np.testing.assert_allclose(read_slice(tmp_path / "s.dcm").pixels, window_hu(hu), atol=1e-3)
    # Found by content too, whatever the suffix.
    (tmp_path / "s.dcm").rename(tmp_path / "slice0001")
    np.testing.assert_allclose(read_slice(tmp_path / "slice0001").pixels, window_hu(hu), atol=1e-3)


def test_corrupt_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="cannot decode image") as err:
        read_slice(bad)
    assert str(bad) in str(err.value)
    bad_dcm = tmp_path / "bad.dcm"
    bad_dcm.write_bytes(b"not dicom at all")
    with pytest.raises(DataError, match="cannot decode DICOM") as err:
        read_slice(bad_dcm)
    assert str(bad_dcm) in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        read_slice(tmp_path / "missing.png")


def test_every_decoding_failure_is_a_data_error_naming_the_file(tmp_path):
    """Oversized (declared), undersized, non-numeric / non-finite rescale values and
    non-finite pixels: each one a DataError naming the file, never another exception."""
    for path, words in write_bad_slices(tmp_path).items():
        with pytest.raises(DataError) as err:
            read_slice(path)
        assert str(path) in str(err.value) and words in str(err.value), (path, str(err.value))


def test_oversized_images_are_refused_before_their_pixels_are_decoded(tmp_path, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    for w, h in ((MAX_IMAGE_SIDE + 1, 40), (40, MAX_IMAGE_SIDE + 1), (20000, 20000)):
        with pytest.raises(DataError, match="maximum"):
            read_slice(declared_png(tmp_path / f"{w}x{h}.png", w, h))
    dcm = tmp_path / "tall.dcm"
    write_ct_dicom(dcm, np.zeros((40, 40), np.float32))
    data = dcm.read_bytes()
    rows = b"\x28\x00\x10\x00US\x02\x00" + struct.pack("<H", 40)  # (0028,0010) Rows, explicit VR LE
    assert data.count(rows) == 1
    dcm.write_bytes(data.replace(rows, rows[:-2] + struct.pack("<H", 60000)))
    with pytest.raises(DataError, match="40x60000 pixels, more than the maximum") as err:
        read_slice(dcm)
    assert str(dcm) in str(err.value)


def test_size_limits_are_inclusive(tmp_path):
    Image.fromarray(np.zeros((MIN_IMAGE_SIDE, MIN_IMAGE_SIDE), np.uint8)).save(tmp_path / "min.png")
    assert read_slice(tmp_path / "min.png").pixels.shape == (MIN_IMAGE_SIDE, MIN_IMAGE_SIDE)
    Image.fromarray(np.zeros((MIN_IMAGE_SIDE - 1, 64), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(DataError, match=f"64x{MIN_IMAGE_SIDE - 1} pixels, less than the minimum"):
        read_slice(tmp_path / "small.png")


def test_crop_resize_and_load_slice(tmp_path):
    img = np.zeros((100, 200), dtype=np.float32)
    img[20:60, 50:150] = 1.0
    assert crop_box(img, (50, 20, 150, 60)).min() == 1.0
    out = resize(img, 64)
    assert out.shape == (64, 64) and out.dtype == np.float32 and out.flags.writeable
    Image.fromarray((img * 255).astype(np.uint8)).save(tmp_path / "x.png")
    s = load_slice(tmp_path / "x.png", 32, box=(50, 20, 150, 60))
    assert s.shape == (32, 32) and np.allclose(s, 1.0)
    with pytest.raises(DataError, match="empty"):
        load_slice(tmp_path / "x.png", 32, box=(300, 0, 400, 10))


def test_preprocessing_record_round_trips_and_rejects_what_load_slice_cannot_do():
    from ctmask.core.preprocess import Preprocessing

    p = Preprocessing(crop=True, window=(-500.0, 1200.0))
    assert Preprocessing.from_dict(p.to_dict()) == p
    assert Preprocessing.from_dict({}) == Preprocessing(crop=False, resize="bilinear", window=LUNG_WINDOW)
    with pytest.raises(ValueError, match="unsupported resize method 'bicubic'"):
        Preprocessing.from_dict({"resize": "bicubic"})
    with pytest.raises(ValueError, match="crop must be true or false"):
        Preprocessing.from_dict({"crop": "yes"})
