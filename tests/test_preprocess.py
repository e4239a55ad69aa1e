"""Pre-processing shared by training and runtime: decode, window, crop, resize."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from tests_helpers import write_ct_dicom

from ctmask.core.errors import DataError
from ctmask.core.preprocess import LUNG_WINDOW, crop_box, load_slice, read_gray, resize, window_hu


def test_window_maps_lung_window_to_unit_range():
    level, width = LUNG_WINDOW
    hu = np.array([-2000, level - width / 2, level, level + width / 2, 3000], dtype=np.float32)
    np.testing.assert_allclose(window_hu(hu), [0, 0, 0.5, 1, 1], atol=1e-6)


def test_png_8_and_16_bit(tmp_path):
    a8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(a8).save(tmp_path / "a.png")
    np.testing.assert_allclose(read_gray(tmp_path / "a.png"), a8 / 255.0, atol=1e-6)
    a16 = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
    Image.fromarray(a16).save(tmp_path / "b.png")
    np.testing.assert_allclose(read_gray(tmp_path / "b.png"), a16 / 65535.0, atol=1e-4)


def test_dicom_is_converted_to_hu_and_windowed(tmp_path):
    hu = np.array([[-1000.0, -600.0], [40.0, 400.0]], dtype=np.float32)
    write_ct_dicom(tmp_path / "s.dcm", hu)
    np.testing.assert_allclose(read_gray(tmp_path / "s.dcm"), window_hu(hu), atol=1e-3)
    # Found by content too, whatever the suffix.
    (tmp_path / "s.dcm").rename(tmp_path / "slice0001")
    np.testing.assert_allclose(read_gray(tmp_path / "slice0001"), window_hu(hu), atol=1e-3)


def test_corrupt_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="cannot decode image") as err:
        read_gray(bad)
    assert str(bad) in str(err.value)
    bad_dcm = tmp_path / "bad.dcm"
    bad_dcm.write_bytes(b"not dicom at all")
    with pytest.raises(DataError, match="cannot decode DICOM") as err:
        read_gray(bad_dcm)
    assert str(bad_dcm) in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        read_gray(tmp_path / "missing.png")


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
