"""What kind of refusal a reader's failure is (ctmask.scans), and how ``ctmask serve`` maps it to
an HTTP status by that kind, never by the message text; the one sniffer."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from tests_helpers import write_ct_dicom

from ctmask.core.errors import DataError, TooLargeError, UnsupportedFileError
from ctmask.core.spec import GraphSpec
from ctmask.scans.batch import load_batch
from ctmask.scans.listing import collect_sources
from ctmask.scans.sniff import magic, sniff
from ctmask.scans.types import Failure


def _refusal(path) -> Failure:
    """The first failure of reading ``path`` as ``ctmask serve`` does: listing, then decoding."""
    refs, failures = collect_sources([path])
    if failures:
        return failures[0]
    return load_batch(refs, GraphSpec(preset="small", image_size=64, n_rois=4)).failures[0]


def _png(path, width, height):
    Image.new("L", (width, height)).save(path, format="PNG")
    return path


def test_each_refusal_carries_its_kind(tmp_path):
    (tmp_path / "notes").write_bytes(b"patient: doe\nfindings: none\n" * 20)
    (tmp_path / "noise.bin").write_bytes(np.random.default_rng(1).bytes(4096))
    (tmp_path / "truncated.png").write_bytes(_png(tmp_path / "full.png", 64, 64).read_bytes()[:60])
    cases = {
        "notes": (UnsupportedFileError, "not an image ("),
        "noise.bin": (UnsupportedFileError, "not an image ("),
        "big.png": (TooLargeError, "more than the maximum"),
        "small.png": (DataError, "less than the minimum"),
        "truncated.png": (DataError, "cannot decode image"),
    }
    _png(tmp_path / "big.png", 9000, 40)
    _png(tmp_path / "small.png", 16, 16)
    for name, (kind, words) in cases.items():
        failure = _refusal(tmp_path / name)
        assert failure.error is kind and words in failure.reason, (name, failure, failure.error)


def test_a_kind_is_neither_compared_nor_written():
    a, b = Failure("x.png", "why", TooLargeError), Failure("x.png", "why")
    assert a == b and a.to_dict() == b.to_dict() == {"file": "x.png", "error": "why"}
    assert Failure.of("x.png", UnsupportedFileError("not an image", "x.png")).error is UnsupportedFileError


def test_serve_maps_a_refusal_to_its_status_by_kind():
    pytest.importorskip("ray")
    from ctmask.scale.serve_app import _status_of

    # the message text does not matter, only the kind
    assert _status_of(Failure("u", "more than the maximum", DataError)) == 422
    assert _status_of(Failure("u", "anything", TooLargeError)) == 413
    assert _status_of(Failure("u", "anything", UnsupportedFileError)) == 415
    assert _status_of(Failure("u", "not an image (", DataError)) == 422


def test_one_sniffer_for_files_and_uploads(tmp_path):
    buf = io.BytesIO()
    Image.new("L", (40, 40)).save(buf, format="PNG")
    png = buf.getvalue()
    write_ct_dicom(tmp_path / "IM0001", np.zeros((40, 40), np.float32))
    head = (tmp_path / "IM0001").read_bytes()[:132]
    assert magic(png) == "png" and magic(b"\xff\xd8\xff\xe0" + bytes(200)) == "jpeg"
    assert magic(head) == "dicom" and magic(head[:131]) == "" and magic(b"BM" + bytes(200)) == ""
    assert sniff(tmp_path / "IM0001") == "dicom"  # the marker, whatever the name
    (tmp_path / "v.nii.gz").write_bytes(b"\x1f\x8b")
    (tmp_path / "a.PNG").write_bytes(png)
    (tmp_path / "1.2.840.10").write_bytes(b"x")
    (tmp_path / "notes.txt").write_bytes(b"x")
    assert [sniff(tmp_path / n) for n in ("v.nii.gz", "a.PNG", "1.2.840.10", "notes.txt")] == \
        ["nifti", "image", "maybe-dicom", ""]
    pytest.importorskip("ray")
    from ctmask.scale.serve_app import _sniff_magic

    assert (_sniff_magic(png), _sniff_magic(head), _sniff_magic(b"\xff\xd8\xff"), _sniff_magic(b"text")) == \
        (".png", ".dcm", ".jpg", "")
