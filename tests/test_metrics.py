"""Tests of ctmask.core.metrics and ctmask.training.metrics (numpy only, fast)."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from ctmask.core.metrics import classification_report, format_classification_table
from ctmask.core.presets import CLASS_NAMES
from ctmask.training.metrics import dice_scores, format_segmentation_table, mask_ap, mask_iou

H = W = 20


def box(y0, x0, y1, x1, h=H, w=W):
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def pred(masks, scores, labels):
    return {
        "masks": np.asarray(masks, dtype=np.uint8).reshape(-1, H, W),
        "scores": np.asarray(scores, dtype=np.float32),
        "labels": np.asarray(labels, dtype=np.int64),
    }


def gt(masks, labels):
    return {"masks": np.asarray(masks, dtype=bool).reshape(-1, H, W),
            "labels": np.asarray(labels, dtype=np.int64)}


# --- classification -------------------------------------------------------------------


def test_perfect_classification():
    y = [0, 1, 2, 2, 1, 0, 2]
    r = classification_report(y, y)
    assert r["n"] == 7
    assert r["accuracy"] == 1.0
    assert r["class_names"] == list(CLASS_NAMES)
    for name in CLASS_NAMES:
        assert r["per_class"][name]["sensitivity"] == 1.0
        assert r["per_class"][name]["precision"] == 1.0
    assert r["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 3]]


def test_hand_computed_confusion_matrix():
    # true 0: 3 samples -> predicted 0,0,1 ; true 1: 2 -> 1,2 ; true 2: 4 -> 2,2,2,0
    y_true = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    y_pred = [0, 0, 1, 1, 2, 2, 2, 2, 0]
    r = classification_report(y_true, y_pred)
    assert r["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 0, 3]]
    assert r["accuracy"] == pytest.approx(6 / 9)
    pc = r["per_class"]
    assert pc["normal"]["sensitivity"] == pytest.approx(2 / 3)
    assert pc["normal"]["precision"] == pytest.approx(2 / 3)
    assert pc["pneumonia"]["sensitivity"] == pytest.approx(1 / 2)
    assert pc["pneumonia"]["precision"] == pytest.approx(1 / 2)
    assert pc["covid19"]["sensitivity"] == pytest.approx(3 / 4)
    assert pc["covid19"]["precision"] == pytest.approx(3 / 4)
    assert [pc[n]["support"] for n in CLASS_NAMES] == [3, 2, 4]
    assert [pc[n]["predicted"] for n in CLASS_NAMES] == [3, 2, 4]


def test_class_never_predicted():
    y_true = np.array([0, 1, 1, 2])
    y_pred = np.array([0, 0, 2, 2])
    r = classification_report(y_true, y_pred)
    p = r["per_class"]["pneumonia"]
    assert p["predicted"] == 0
    assert p["precision"] == 0.0
    assert p["sensitivity"] == 0.0
    assert p["support"] == 2
    assert r["per_class"]["covid19"]["precision"] == pytest.approx(0.5)


def test_classification_validation():
    with pytest.raises(ValueError, match="different lengths: 3 != 2"):
        classification_report([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match=r"outside \[0, 2\].*\[3, 7\].*positions \[1, 2\]"):
        classification_report([0, 3, 7], [0, 1, 2])
    with pytest.raises(ValueError, match="y_pred.*-1"):
        classification_report([0, 1], [0, -1])
    with pytest.raises(ValueError, match="non-integer"):
        classification_report([0, 1.5], [0, 1])
    with pytest.raises(ValueError, match="empty"):
        classification_report([], [])


def test_format_classification_table():
    r = classification_report([0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 0, 1, 1, 2, 2, 2, 2, 0])
    text = format_classification_table(r)
    for name in CLASS_NAMES:
        assert name in text
    assert "66.67" in text and "50.00" in text and "75.00" in text
    assert "overall accuracy: 66.67 %" in text
    assert "true \\ pred" in text
    # confusion matrix row for covid19 is "1 0 3"
    lines = text.splitlines()
    row = [ln for ln in lines if ln.startswith("covid19") and ln.split()[1:] == ["1", "0", "3"]]
    assert len(row) == 1


# --- mask AP --------------------------------------------------------------------------


def test_mask_iou_values():
    a = np.stack([box(0, 0, 10, 10), box(0, 0, 10, 5)])
    b = np.stack([box(0, 0, 10, 10), np.zeros((H, W), bool)])
    iou = mask_iou(a, b)
    np.testing.assert_allclose(iou, [[1.0, 0.0], [0.5, 0.0]])


def test_perfect_ap():
    g1, g2, g3 = box(0, 0, 5, 5), box(10, 10, 18, 18), box(2, 12, 8, 19)
    preds = [pred([g1, g2], [0.9, 0.8], [1, 2]), pred([g3], [0.7], [1])]
    gts = [gt([g1, g2], [1, 2]), gt([g3], [1])]
    r = mask_ap(preds, gts)
    assert r["mAP"] == pytest.approx(1.0)
    assert r["AP50"] == pytest.approx(1.0)
    assert r["AP75"] == pytest.approx(1.0)
    assert r["per_class"][1]["n_gt"] == 2 and r["per_class"][1]["n_pred"] == 2
    assert r["per_class"][2]["AP"] == pytest.approx(1.0)


def test_ap_false_positive_ranked_above_true_positive():
    g = box(0, 0, 10, 10)
    fp = box(12, 12, 18, 18)
    r = mask_ap([pred([fp, g], [0.9, 0.5], [1, 1])], [gt([g], [1])], classes=(1,))
    # ranks: FP (P=0, R=0), TP (P=1/2, R=1): envelope 1/2 at every recall level.
    assert r["per_class"][1]["AP"] == pytest.approx(0.5)

    # Two GT over two images; ranking TP, FP, TP:
    # recall 0.5, 0.5, 1.0 ; precision 1, 1/2, 2/3 ; envelope 1, 2/3, 2/3
    # recall levels 0.00..0.50 (51 points) -> 1 ; 0.51..1.00 (50 points) -> 2/3
    g2 = box(5, 5, 15, 15)
    preds = [pred([g, fp], [0.9, 0.8], [1, 1]), pred([g2], [0.7], [1])]
    gts = [gt([g], [1]), gt([g2], [1])]
    r = mask_ap(preds, gts, classes=(1,))
    expected = (51 * 1.0 + 50 * (2 / 3)) / 101
    assert r["per_class"][1]["AP"] == pytest.approx(expected)
    assert r["mAP"] == pytest.approx(expected)


def test_iou_threshold_behaviour():
    g = box(0, 0, 10, 10)  # 100 px
    p = box(0, 0, 10, 6)  # 60 px inside g: IoU exactly 0.6
    # IoU = 59 / 100 (just under 0.6): counts for 0.50 and 0.55 only -> AP 2/10
    p2 = box(0, 0, 10, 6)
    p2[9, 5] = False
    assert mask_iou(p2[None], g[None])[0, 0] == pytest.approx(0.59)
    r = mask_ap([pred([p2], [0.9], [1])], [gt([g], [1])], classes=(1,))
    pc = r["per_class"][1]
    assert pc["AP_per_threshold"] == pytest.approx([1, 1] + [0] * 8)
    assert pc["AP"] == pytest.approx(0.2)
    assert pc["AP50"] == 1.0 and pc["AP75"] == 0.0
    # IoU exactly 0.6: COCO's rule is IoU >= t, so it also counts at t = 0.60 -> 0.3
    r = mask_ap([pred([p], [0.9], [1])], [gt([g], [1])], classes=(1,))
    assert r["per_class"][1]["AP"] == pytest.approx(0.3)


def test_ap_class_without_gt_is_nan_and_excluded():
    g = box(0, 0, 10, 10)
    preds = [pred([g, box(12, 12, 16, 16)], [0.9, 0.8], [1, 2])]
    gts = [gt([g], [1])]
    r = mask_ap(preds, gts)
    assert math.isnan(r["per_class"][2]["AP"])
    assert r["per_class"][2]["n_pred"] == 1 and r["per_class"][2]["n_gt"] == 0
    assert r["mAP"] == pytest.approx(1.0)


def test_ap_gt_without_detections_and_other_class_not_matched():
    g = box(0, 0, 10, 10)
    # a perfect mask with the wrong class is not a match for class 1
    r = mask_ap([pred([g], [0.9], [2])], [gt([g], [1])], classes=(1, 2))
    assert r["per_class"][1]["AP"] == 0.0
    assert math.isnan(r["per_class"][2]["AP"])
    assert r["mAP"] == 0.0


def test_ap_duplicate_detection_is_false_positive_and_max_detections():
    g = box(0, 0, 10, 10)
    r = mask_ap([pred([g, g], [0.9, 0.8], [1, 1])], [gt([g], [1])], classes=(1,))
    assert r["per_class"][1]["AP"] == pytest.approx(1.0)  # FP after full recall
    r = mask_ap([pred([g, g], [0.5, 0.9], [1, 1])], [gt([g], [1])], classes=(1,), max_detections=1)
    assert r["per_class"][1]["n_pred"] == 1


def test_ap_validation():
    g = box(0, 0, 10, 10)
    with pytest.raises(ValueError, match="different lengths"):
        mask_ap([], [gt([g], [1])])
    with pytest.raises(ValueError, match="counts must match"):
        mask_ap([pred([g], [0.9, 0.1], [1])], [gt([g], [1])])


def test_empty_predictions_shape():
    g = box(0, 0, 10, 10)
    empty = {"masks": np.zeros((0,), np.uint8), "scores": [], "labels": []}
    r = mask_ap([empty], [gt([g], [1])], classes=(1,))
    assert r["per_class"][1]["AP"] == 0.0


# --- Dice -----------------------------------------------------------------------------


def test_dice_perfect_and_half_overlap():
    gt_map = np.zeros((H, W), np.int64)
    gt_map[0:10, 0:10] = 1
    r = dice_scores([gt_map], [gt_map])
    assert r["per_class"][1]["dice"] == 1.0
    assert math.isnan(r["per_class"][2]["dice"])
    assert r["mean_dice"] == 1.0

    # Two 10x10 squares overlapping by half (50 px): Dice = 2*50/(100+100) = 0.5
    pred_map = np.zeros((H, W), np.int64)
    pred_map[0:10, 5:15] = 1
    r = dice_scores([pred_map], [gt_map])
    assert r["per_class"][1]["dice"] == pytest.approx(0.5)
    assert r["per_class"][1]["per_image_mean"] == pytest.approx(0.5)


def test_dice_dataset_vs_per_image():
    a = np.zeros((H, W), np.int64)
    a[0:10, 0:10] = 2  # 100 px
    b = np.zeros((H, W), np.int64)
    b[0:2, 0:2] = 2  # 4 px
    empty = np.zeros((H, W), np.int64)
    # image 1 perfect (100 px), image 2 missed (4 px gt, 0 pred), image 3 both empty
    r = dice_scores([a, empty, empty], [a, b, empty], classes=(2,))
    pc = r["per_class"][2]
    assert pc["dice"] == pytest.approx(200 / 204)
    assert pc["per_image_mean"] == pytest.approx(0.5)
    assert pc["n_images"] == 2
    with pytest.raises(ValueError, match="different lengths"):
        dice_scores([a], [])
    with pytest.raises(ValueError, match="image 0"):
        dice_scores([a], [np.zeros((3, 3), np.int64)])


def test_format_segmentation_table():
    g = box(0, 0, 10, 10)
    ap = mask_ap([pred([g], [0.9], [1])], [gt([g], [1])])
    gm = g.astype(np.int64)
    dice = dice_scores([gm], [gm])
    text = format_segmentation_table(ap, dice)
    assert "ggo" in text and "consolidation" in text and "mean" in text
    assert "1.0000" in text and "n/a" in text
    assert "AP@[.50:.95]" in text and "Dice" in text
    assert "ggo" in format_segmentation_table(None, dice)


def test_metrics_do_not_import_torch():
    code = ("import sys, ctmask.core.metrics, ctmask.training.metrics; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
