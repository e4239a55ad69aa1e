"""RoI boxes back in the slice's own pixel frame, and the PNG overlay drawn from them (torch-free)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ctmask.runtime.overlays import boxes_to_source, draw_overlay, rank_colour, top_boxes


def test_boxes_to_source_without_crop_on_a_non_square_slice():
    # A 300 (H) x 600 (W) slice resized to 192 x 192: x scales by 600/192, y by 300/192.
    boxes = np.array([[0, 0, 192, 192], [48, 96, 96, 192], [19.2, 38.4, 57.6, 76.8]], np.float32)
    out = boxes_to_source(boxes, 192, (300, 600), None)
    expected = np.array([[0, 0, 600, 300], [150, 150, 300, 300], [60, 60, 180, 120]], np.float32)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4)
    assert out.dtype == np.float32 and out.shape == (3, 4)


def test_boxes_to_source_through_a_crop():
    # Crop (xmin, ymin, xmax, ymax) = (100, 50, 356, 178): 256 x 128 px resized to 64 x 64.
    boxes = np.array([[0, 0, 64, 64], [16, 32, 32, 48]], np.float32)
    out = boxes_to_source(boxes, 64, (400, 500), (100, 50, 356, 178))
    expected = np.array([[100, 50, 356, 178], [100 + 64, 50 + 64, 100 + 128, 50 + 96]], np.float32)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4)


def test_boxes_to_source_clips_the_crop_and_the_boxes_to_the_image():
    # The crop reaches beyond the image (as a split file's box may): it is clipped as
    # load_batch clips it, to (0, 10, 200, 110) on this 120 x 200 slice.
    out = boxes_to_source(np.array([[0, 0, 100, 100], [50, 50, 100, 100]], np.float32), 100, (120, 200),
                          (-20, 10, 260, 110))
    np.testing.assert_allclose(out, [[0, 10, 200, 110], [100, 60, 200, 110]], atol=1e-4)
    # A box beyond the input (numerically S + epsilon) stays inside the slice.
    out = boxes_to_source(np.array([[-0.5, -1.0, 64.25, 70.0]], np.float32), 64, (33, 47))
    assert (out >= 0).all() and out[0, 2] <= 47 and out[0, 3] <= 33
    assert boxes_to_source(np.zeros((0, 4), np.float32), 64, (32, 32)).shape == (0, 4)
    with pytest.raises(ValueError, match="empty"):
        boxes_to_source(np.zeros((1, 4), np.float32), 64, (32, 32), (40, 0, 50, 10))
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        boxes_to_source(np.zeros((2, 5), np.float32), 64, (32, 32))


def test_top_boxes_skips_padding_rows_and_keeps_rank_order():
    rois = np.zeros((2, 6, 5), np.float32)
    rois[0, :3, 0] = [0.9, 0.5, 0.2]
    rois[1, :1, 0] = [0.7]
    boxes = np.zeros((2, 6, 4), np.float32)
    boxes[0, :3] = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    boxes[1, 0] = [4, 3, 2, 1]
    outputs = {"rois": rois, "boxes": boxes}
    b, s = top_boxes(outputs, 0, 2)
    np.testing.assert_array_equal(b, [[1, 2, 3, 4], [5, 6, 7, 8]])
    np.testing.assert_array_equal(s, np.float32([0.9, 0.5]))
    b, s = top_boxes(outputs, 1, 5)
    assert b.shape == (1, 4) and s.tolist() == [pytest.approx(0.7)]
    with pytest.raises(ValueError, match="older ctmask format"):
        top_boxes({"rois": rois}, 0, 2)


def _is_colour(px) -> bool:
    r, g, b = px
    return not (r == g == b)


def test_draw_overlay_writes_a_png_of_the_source_size_with_coloured_box_edges(tmp_path):
    h, w = 160, 240  # non-square
    pixels = np.tile(np.linspace(0, 1, w, dtype=np.float32), (h, 1))
    boxes = np.array([[40, 60, 120, 140], [150.5, 80.2, 230, 150]], np.float32)
    out = tmp_path / "o" / "slice.png"
    draw_overlay(pixels, boxes, np.float32([0.91, 0.42]), "covid19", {"normal": 0.1, "pneumonia": 0.2,
                                                                      "covid19": 0.7}, out)
    img = Image.open(out)
    assert img.format == "PNG" and img.mode == "RGB" and img.size == (w, h)
    rgb = np.asarray(img)
    # Box edges carry their rank's colour: the left and bottom edges of box 1 (clear of the
    # labels), the right edge of box 2.
    assert tuple(rgb[100, 40]) == rank_colour(1) and tuple(rgb[139, 80]) == rank_colour(1)
    assert tuple(rgb[120, 229]) == rank_colour(2)
    assert rank_colour(1) != rank_colour(2)
    # Inside the boxes, away from the edges and labels, the slice is gray.
    assert not _is_colour(rgb[100, 80]) and not _is_colour(rgb[120, 190])
    # The header (class and probability, white antialiased text on black) sits at the top
    # left, where the slice itself is black.
    head = rgb[:12, :60].astype(int)
    assert (head == 0).all(axis=-1).any() and (head > 200).all(axis=-1).sum() >= 10
    assert not list(out.parent.glob(".*.tmp"))  # written atomically, nothing left behind


def test_draw_overlay_keeps_every_mark_inside_the_image(tmp_path):
    pixels = np.full((40, 36), 0.5, np.float32)
    # Boxes touching or exceeding the edges, and a degenerate one.
    boxes = np.array([[0, 0, 36, 40], [30, 35, 36, 40], [10, 10, 10, 10]], np.float32)
    out = tmp_path / "edge.png"
    draw_overlay(pixels, boxes, np.float32([0.8, 0.3, 0.1]), "normal", {"normal": 0.9}, out)
    rgb = np.asarray(Image.open(out))
    assert rgb.shape == (40, 36, 3)
    # The whole-slice box is drawn on the last row and column, inside the image.
    assert tuple(rgb[39, 18]) == rank_colour(1) and tuple(rgb[20, 35]) == rank_colour(1)


def test_draw_overlay_refuses_mismatched_inputs_and_leaves_no_file(tmp_path):
    out = tmp_path / "bad.png"
    with pytest.raises(ValueError, match="scores"):
        draw_overlay(np.zeros((32, 32), np.float32), np.zeros((2, 4), np.float32), np.zeros(1, np.float32),
                     "normal", {"normal": 1.0}, out)
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        draw_overlay(np.zeros((1, 32, 32), np.float32), np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                     "normal", {"normal": 1.0}, out)
    assert not out.exists()
    # No boxes at all: the slice and its header only.
    draw_overlay(np.zeros((32, 48), np.float32), np.zeros((0, 4), np.float32), np.zeros(0, np.float32), "normal",
                 {"normal": 1.0}, out)
    assert Image.open(out).size == (48, 32)
