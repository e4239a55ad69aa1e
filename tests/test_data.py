"""Tests of ctmask.data: COVIDx-CT split files, CNCB masks and the synthetic generator."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ctmask.core.errors import DataError
from ctmask.data.cncb import lesion_label_map, list_segmentation, mask_to_instances, read_mask
from ctmask.data.covidx import SplitEntry, read_split, write_split
from ctmask.data.synth import DESCRIPTION, generate_slice, synthesize
from ctmask.scans.decode import read_slice


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)
    return path


# ---------------------------------------------------------------- split files


@pytest.fixture
def split_dir(tmp_path):
    for name in ("a.png", "b.png"):
        _png(tmp_path / "images" / name, np.zeros((8, 8)))
    return tmp_path


def test_read_split_good_file(split_dir):
    f = split_dir / "train.txt"
    f.write_text("# comment\n\na.png 0 1 2 7 8\nb.png 2 0 0 8 8\n")
    entries = read_split(f)
    assert entries == [
        SplitEntry(split_dir / "images" / "a.png", 0, (1, 2, 7, 8)),
        SplitEntry(split_dir / "images" / "b.png", 2, (0, 0, 8, 8)),
    ]
    write_split(split_dir / "copy.txt", entries)
    assert read_split(split_dir / "copy.txt", image_dir=split_dir / "images") == entries


def test_read_split_missing_image_names_image_and_line(split_dir):
    f = split_dir / "val.txt"
    f.write_text("a.png 0 0 0 8 8\nmissing.png 1 0 0 8 8\n")
    with pytest.raises(DataError) as exc:
        read_split(f)
    msg = str(exc.value)
    assert "missing.png" in msg and f"{f} line 2" in msg
    assert len(read_split(f, check_exists=False)) == 2


@pytest.mark.parametrize(
    "line, words",
    [("a.png 0 0 0 8", ["expected 6 fields"]), ("a.png 3 0 0 8 8", ["class 3"]),
     ("a.png x 0 0 8 8", ["'x'"]), ("a.png 1 5 0 5 8", ["bad box"])],
)
def test_read_split_malformed_line(split_dir, line, words):
    f = split_dir / "test.txt"
    f.write_text("a.png 0 0 0 8 8\n" + line + "\n")
    with pytest.raises(DataError) as exc:
        read_split(f)
    msg = str(exc.value)
    assert str(f) in msg and "line 2" in msg
    assert all(w in msg for w in words)


@pytest.mark.parametrize("box", ["0 0 inf 100", "0 0 1e400 100", "-inf 0 8 8", "0 0 nan 8"])
def test_read_split_non_finite_box_is_a_data_error(split_dir, box):
    """int(float('inf')) raises OverflowError, not ValueError: still a DataError naming file and line."""
    f = split_dir / "inf.txt"
    f.write_text("a.png 0 0 0 8 8\nb.png 1 " + box + "\n")
    with pytest.raises(DataError) as exc:
        read_split(f)
    assert f"{f}: line 2: box" in str(exc.value)


def test_read_split_ignores_a_byte_order_mark(split_dir):
    f = split_dir / "bom.txt"
    f.write_bytes("\ufeffa.png 0 1 2 7 8\nb.png 2 0 0 8 8\n".encode())
    entries = read_split(f)
    assert [e.path.name for e in entries] == ["a.png", "b.png"]
    assert [e.line for e in entries] == [1, 2]


def test_read_split_empty_is_error(split_dir):
    f = split_dir / "empty.txt"
    f.write_text("# nothing\n")
    with pytest.raises(DataError, match="no slices"):
        read_split(f)


# ---------------------------------------------------------------- masks


def test_corrupt_png_is_data_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    for reader in (read_mask, read_slice):
        with pytest.raises(DataError) as exc:
            reader(bad)
        assert str(bad) in str(exc.value)


def test_mask_unexpected_value_listed(tmp_path):
    arr = np.zeros((10, 10), np.uint8)
    arr[2, 2] = 7
    path = _png(tmp_path / "m.png", arr)
    with pytest.raises(DataError) as exc:
        read_mask(path)
    assert "[7]" in str(exc.value) and str(path) in str(exc.value)


def test_mask_shape_mismatch(tmp_path):
    path = _png(tmp_path / "m.png", np.zeros((10, 12)))
    with pytest.raises(DataError, match=r"\(10, 12\).*\(10, 10\)"):
        read_mask(path, expected_shape=(10, 10))


def test_list_segmentation_missing_mask(tmp_path):
    _png(tmp_path / "images" / "x.png", np.zeros((4, 4)))
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match="x.png"):
        list_segmentation(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        list_segmentation(tmp_path / "nope")


def test_mask_to_instances():
    m = np.zeros((64, 64), np.uint8)
    m[:, :40] = 1  # lung field: background for the detector
    m[5:20, 5:15] = 2  # GGO, 150 px
    m[30:50, 20:30] = 3  # consolidation, 200 px
    m[55:60, 50:55] = 2  # tiny GGO, 25 px: dropped
    assert set(np.unique(lesion_label_map(m))) == {0, 1, 2}
    boxes, labels, masks = mask_to_instances(m)
    np.testing.assert_array_equal(boxes, [[5, 5, 15, 20], [20, 30, 30, 50]])
    assert boxes.dtype == np.float32 and labels.dtype == np.int64 and masks.dtype == np.uint8
    np.testing.assert_array_equal(labels, [1, 2])
    assert masks.shape == (2, 64, 64) and masks[0].sum() == 150 and masks[1].sum() == 200
    b, lab, k = mask_to_instances(np.ones((16, 16), np.uint8))
    assert b.shape == (0, 4) and lab.shape == (0,) and k.shape == (0, 16, 16)


# ---------------------------------------------------------------- generator


def test_generator_deterministic():
    a, b = generate_slice(3, 7, 2), generate_slice(3, 7, 2)
    for name in ("hu", "image", "mask"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.body_box == b.body_box
    c = generate_slice(4, 7, 2)
    assert not np.array_equal(a.image, c.image)
    assert a.hu.dtype == np.float32 and a.hu.shape == (512, 512)
    assert a.image.dtype == np.uint8 and a.mask.dtype == np.uint8


def _halves(mask):
    lesion = mask >= 2
    return lesion[:, :256].sum(), lesion[:, 256:].sum()


def test_class_patterns_and_hu_ranges():
    ggo_means, cons_means, bilateral = [], [], 0
    for i in range(10):
        normal = generate_slice(11, i, 0)
        assert normal.mask.max() == 1 and (normal.mask == 1).sum() > 10_000
        covid = generate_slice(11, 100 + i, 2)
        left, right = _halves(covid.mask)
        bilateral += left > 0 and right > 0
        assert (covid.mask == 2).sum() > 0
        ggo_means.append(covid.hu[covid.mask == 2].mean())
        pneu = generate_slice(11, 200 + i, 1)
        assert (pneu.mask == 3).sum() > 400
        # Median: air bronchograms are part of the lesion but not of its density.
        cons_means.append(np.median(pneu.hu[pneu.mask == 3]))
        assert min(_halves(pneu.mask)) == 0  # pneumonia is unilateral
        for s in (covid, pneu):  # every lesion component is an instance (> 100 px)
            _, labels, masks = mask_to_instances(s.mask)
            assert masks.sum() == (s.mask >= 2).sum()
            x0, y0, x1, y1 = s.body_box
            assert 0 <= x0 < x1 <= 512 and 0 <= y0 < y1 <= 512
    assert bilateral >= 7
    assert -720 < np.mean(ggo_means) < -300 and all(-760 < m < -250 for m in ggo_means)
    assert all(-140 < m < 80 for m in cons_means)


def test_synthesize_layout(tmp_path):
    out = tmp_path / "synth"
    calls = []
    summary = synthesize(out, 12, seed=1, workers=1, progress=lambda d, n: calls.append((d, n)))
    assert calls[-1] == (12, 12)
    meta = json.loads((out / "synth.json").read_text())
    assert meta["seed"] == 1 and meta["description"] == DESCRIPTION and "SYNTHETIC" in DESCRIPTION
    total = 0
    for split in ("train", "val", "test"):
        entries = read_split(out / f"{split}_COVIDx_CT.txt")
        total += len(entries)
        assert meta["splits"][split]["n"] == len(entries) == summary["splits"][split]["n"]
        counts = np.bincount([e.label for e in entries], minlength=3)
        assert counts.max() - counts.min() <= 1  # balanced
        samples = list_segmentation(out / "segmentation" / split)
        assert [s.image.name for s in samples] == sorted(e.path.name for e in entries)
        for e, s in zip(sorted(entries, key=lambda e: e.path.name), samples):
            img = read_slice(s.image).pixels
            mask = read_mask(s.mask, expected_shape=img.shape)
            assert set(np.unique(mask)) <= {0, 1, 2, 3}
            assert (mask >= 2).any() == (e.label != 0)
            ref = generate_slice(1, int(e.path.stem.split("_")[1]), e.label)
            np.testing.assert_array_equal(np.asarray(Image.open(e.path)), ref.image)
    assert total == 12

    # Re-running into the same folder is allowed and drops slices of the bigger run.
    synthesize(out, 6, seed=1, workers=1)
    assert len(list((out / "images").glob("*.png"))) == 6
    assert len(list((out / "segmentation" / "train" / "masks").glob("*.png"))) == len(
        read_split(out / "train_COVIDx_CT.txt"))


def test_synthesize_refuses_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a synth output"):
        synthesize(tmp_path, 3, workers=1)


def test_train_cls_with_an_infinite_box_is_a_clear_error(split_dir):
    """`train-cls --train-split` (and evaluate, infer --boxes: the same reader) used to die with
    an OverflowError traceback on a box of `inf`."""
    from typer.testing import CliRunner

    from ctmask.cli.main import app

    f = split_dir / "tr_inf.txt"
    f.write_text("a.png 0 0 0 8 8\nb.png 1 0 0 1e400 8\n")
    res = CliRunner().invoke(app, ["train-cls", str(split_dir / "seg.pt"), "--train-split", str(f),
                                   "--out", str(split_dir / "cls.pt"), "-q"])
    assert res.exit_code == 2 and f"{f}: line 2: box" in res.output and "not finite" in res.output
    assert "Traceback" not in res.output and not (split_dir / "cls.pt").exists()
