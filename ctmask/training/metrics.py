"""Segmentation metrics of the detector (training and ``ctmask evaluate`` of a segmentation
checkpoint): COCO-style mask AP averaged over IoU 0.50:0.95 (:func:`mask_ap`) and Dice of
label maps (:func:`dice_scores`), shown together by :func:`format_segmentation_table`.

Numpy only (no torch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from ctmask.core.metrics import text_table
from ctmask.core.presets import LESION_NAMES

COCO_IOU_THRESHOLDS: np.ndarray = np.linspace(0.5, 0.95, 10)
"""IoU thresholds 0.50, 0.55, ..., 0.95 of COCO mask AP."""

RECALL_POINTS: np.ndarray = np.linspace(0.0, 1.0, 101)
"""The 101 recall levels 0.00, 0.01, ..., 1.00 of COCO interpolated AP."""


# ---------------------------------------------------------------------------------------
# Segmentation: mask AP
# ---------------------------------------------------------------------------------------


def _binary_masks(masks, name: str, mask_threshold: float) -> np.ndarray:
    """Return masks as bool [K, H, W]; accepts [K, H, W] or [K, 1, H, W].

    Bool / integer masks are foreground where non-zero; float masks (probabilities)
    where ``> mask_threshold``.
    """
    m = np.asarray(masks)
    if m.size == 0:
        # An empty set of masks may come without spatial dims, e.g. shape (0,).
        spatial = m.shape[-2:] if m.ndim >= 3 else (0, 0)
        return np.zeros((0, *spatial), dtype=bool)
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 3:
        raise ValueError(f"{name} must have shape [K, H, W] (or [K, 1, H, W]), got {m.shape}")
    if m.dtype == bool:
        return m
    if np.issubdtype(m.dtype, np.floating):
        return m > mask_threshold
    return m != 0


def mask_iou(masks_a: np.ndarray, masks_b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of two sets of binary masks.

    Intersections come from one float32 matrix product of the flattened masks (exact
    for masks up to 2**24 pixels); the ratio is taken in float64.

    Args:
        masks_a: bool [K, H, W].
        masks_b: bool [M, H, W] (same H, W).

    Returns:
        float64 [K, M]; 0 where both masks are empty.
    """
    k, m = masks_a.shape[0], masks_b.shape[0]
    if k == 0 or m == 0:
        return np.zeros((k, m), dtype=np.float64)
    if masks_a.shape[1:] != masks_b.shape[1:]:
        raise ValueError(
            f"mask sizes differ: {masks_a.shape[1:]} vs {masks_b.shape[1:]}"
        )
    a = masks_a.reshape(k, -1).astype(np.float32)
    b = masks_b.reshape(m, -1).astype(np.float32)
    inter = (a @ b.T).astype(np.float64)
    area_a = a.sum(axis=1, dtype=np.float64)
    area_b = b.sum(axis=1, dtype=np.float64)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    return iou


def _interpolated_ap(tp: np.ndarray, n_gt: int) -> float:
    """101-point interpolated AP of detections sorted by descending score.

    Args:
        tp: bool [D], True where the d-th ranked detection is a true positive.
        n_gt: number of ground-truth objects (> 0).

    Returns:
        AP in [0, 1]: mean over recall levels r in {0, 0.01, ..., 1} of the precision
        envelope (max precision at recall >= r); 0 where recall r is never reached.
    """
    if tp.size == 0:
        return 0.0
    tp_cum = np.cumsum(tp, dtype=np.float64)
    fp_cum = np.cumsum(~tp, dtype=np.float64)
    recall = tp_cum / n_gt
    precision = tp_cum / (tp_cum + fp_cum)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, RECALL_POINTS, side="left")
    q = np.zeros(RECALL_POINTS.shape[0], dtype=np.float64)
    ok = idx < recall.shape[0]
    q[ok] = envelope[idx[ok]]
    return float(q.mean())


def _threshold_index(thresholds: np.ndarray, value: float) -> int | None:
    hits = np.flatnonzero(np.isclose(thresholds, value, atol=1e-9))
    return int(hits[0]) if hits.size else None


def mask_ap(
    predictions: Sequence[Mapping],
    ground_truths: Sequence[Mapping],
    classes: Sequence[int] = (1, 2),
    iou_thresholds=COCO_IOU_THRESHOLDS,
    max_detections: int = 100,
    mask_threshold: float = 0.5,
) -> dict:
    """COCO-style mask AP averaged over IoU thresholds (default 0.50:0.95).

    For each class and IoU threshold t: the detections of the class in every image are
    cut to the ``max_detections`` highest-scoring ones of that image, then ranked by
    descending score over the whole data set (stable sort). Each detection, in that
    order, matches the unmatched ground-truth mask of the same class and image with the
    highest IoU, provided IoU >= t (COCO's rule, so IoU exactly 0.6 counts at t = 0.6);
    otherwise it is a false positive. AP is the 101-point interpolated area under the
    precision envelope (precision at recall r = max precision at recall >= r). No crowd
    regions and no area ranges are used.

    A class with no ground truth in the set has AP = NaN (at every threshold) and is
    left out of the means over classes; if all classes are NaN the means are NaN. A
    class with ground truth but no detection has AP 0.

    Args:
        predictions: one dict per image with ``masks`` bool/uint8 [K, H, W] (float
            probabilities and [K, 1, H, W] are accepted, thresholded at
            ``> mask_threshold``), ``scores`` float [K] and ``labels`` int [K].
        ground_truths: one dict per image (same order) with ``masks`` [M, H, W] and
            ``labels`` int [M].
        classes: class ids to evaluate (default 1 GGO, 2 consolidation).
        iou_thresholds: float [T] IoU thresholds.
        max_detections: detections kept per image and class (highest scores).
        mask_threshold: binarisation threshold for float masks.

    Returns:
        dict: ``mAP`` (float, mean over classes of the AP averaged over thresholds),
        ``AP50`` and ``AP75`` (floats, mean over classes at IoU 0.5 / 0.75; NaN if that
        threshold is not in ``iou_thresholds``), ``iou_thresholds`` (list of float) and
        ``per_class`` {class_id (int): {"AP", "AP50", "AP75" (float), "AP_per_threshold"
        (list of float [T]), "n_gt", "n_pred" (int; n_pred counts the detections kept
        after ``max_detections``)}}.

    Raises:
        ValueError: list lengths differ, or an image's masks / scores / labels disagree
            in count or size.
    """
    if len(predictions) != len(ground_truths):
        raise ValueError(
            f"predictions and ground_truths have different lengths: "
            f"{len(predictions)} != {len(ground_truths)}"
        )
    thresholds = np.asarray(iou_thresholds, dtype=np.float64).reshape(-1)
    if thresholds.size == 0:
        raise ValueError("iou_thresholds is empty")
    if max_detections < 1:
        raise ValueError(f"max_detections must be >= 1, got {max_detections}")
    classes = [int(c) for c in classes]
    images = _validated_images(predictions, ground_truths, mask_threshold)
    i50 = _threshold_index(thresholds, 0.5)
    i75 = _threshold_index(thresholds, 0.75)
    per_class = {c: _class_entry(*_class_ap(images, c, thresholds, max_detections), i50, i75) for c in classes}
    return {
        "mAP": _class_mean(per_class, classes, "AP"),
        "AP50": _class_mean(per_class, classes, "AP50"),
        "AP75": _class_mean(per_class, classes, "AP75"),
        "iou_thresholds": [float(t) for t in thresholds],
        "per_class": per_class,
    }


def _class_entry(ap_t: np.ndarray, n_gt: int, n_pred: int, i50: int | None, i75: int | None) -> dict:
    """One class's line of :func:`mask_ap`'s ``per_class``."""
    return {
        "AP": float(ap_t.mean()) if n_gt > 0 else math.nan,
        "AP50": float(ap_t[i50]) if i50 is not None else math.nan,
        "AP75": float(ap_t[i75]) if i75 is not None else math.nan,
        "AP_per_threshold": [float(v) for v in ap_t],
        "n_gt": int(n_gt),
        "n_pred": n_pred,
    }


def _class_mean(per_class: dict[int, dict], classes: list[int], key: str) -> float:
    """Mean of ``key`` over the classes where it is not NaN (NaN when none is)."""
    vals = [per_class[c][key] for c in classes if not math.isnan(per_class[c][key])]
    return float(np.mean(vals)) if vals else math.nan


_Image = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""One image for :func:`mask_ap`: prediction masks, scores, labels; ground-truth masks, labels."""


def _validated_images(predictions: Sequence[Mapping], ground_truths: Sequence[Mapping],
                      mask_threshold: float) -> list[_Image]:
    """Per image: binarised masks, scores, labels; validated once."""
    images = []
    for i, (pred, gt) in enumerate(zip(predictions, ground_truths)):
        pm = _binary_masks(pred["masks"], f"predictions[{i}]['masks']", mask_threshold)
        ps = np.asarray(pred["scores"], dtype=np.float64).reshape(-1)
        pl = np.asarray(pred["labels"]).reshape(-1).astype(np.int64)
        gm = _binary_masks(gt["masks"], f"ground_truths[{i}]['masks']", mask_threshold)
        gl = np.asarray(gt["labels"]).reshape(-1).astype(np.int64)
        if not (pm.shape[0] == ps.shape[0] == pl.shape[0]):
            raise ValueError(
                f"predictions[{i}]: {pm.shape[0]} masks, {ps.shape[0]} scores, "
                f"{pl.shape[0]} labels; counts must match"
            )
        if gm.shape[0] != gl.shape[0]:
            raise ValueError(
                f"ground_truths[{i}]: {gm.shape[0]} masks but {gl.shape[0]} labels"
            )
        if pm.shape[0] and gm.shape[0] and pm.shape[1:] != gm.shape[1:]:
            raise ValueError(
                f"image {i}: prediction masks are {pm.shape[1:]} but ground-truth masks "
                f"are {gm.shape[1:]}"
            )
        images.append((pm, ps, pl, gm, gl))
    return images


def _class_ap(images: list[_Image], c: int, thresholds: np.ndarray,
              max_detections: int) -> tuple[np.ndarray, int, int]:
    """AP of class ``c`` at every threshold (NaN without ground truth), its ground-truth
    count and its detections kept."""
    # Gather detections of class c over the data set; IoU against GT of their image.
    det_scores, det_image, det_row = [], [], []
    ious_per_image: dict[int, np.ndarray] = {}
    n_gt = 0
    for i, (pm, ps, pl, gm, gl) in enumerate(images):
        g_idx = np.flatnonzero(gl == c)
        d_idx = np.flatnonzero(pl == c)
        n_gt += g_idx.size
        if d_idx.size:
            order = np.argsort(-ps[d_idx], kind="stable")[:max_detections]
            d_idx = d_idx[order]
            ious_per_image[i] = mask_iou(pm[d_idx], gm[g_idx])
            det_scores.append(ps[d_idx])
            det_image.append(np.full(d_idx.size, i, dtype=np.int64))
            det_row.append(np.arange(d_idx.size, dtype=np.int64))
    n_pred = int(sum(s.size for s in det_scores))
    ap_t = np.full(thresholds.shape[0], np.nan)
    if n_gt > 0:
        if n_pred == 0:
            ap_t[:] = 0.0
        else:
            scores = np.concatenate(det_scores)
            img = np.concatenate(det_image)
            row = np.concatenate(det_row)
            rank = np.argsort(-scores, kind="stable")
            img, row = img[rank], row[rank]
            for ti, t in enumerate(thresholds):
                ap_t[ti] = _interpolated_ap(_true_positives(ious_per_image, img, row, t), n_gt)
    return ap_t, n_gt, n_pred


def _true_positives(ious_per_image: dict[int, np.ndarray], img: np.ndarray, row: np.ndarray,
                    t: float) -> np.ndarray:
    """Greedy matching at IoU threshold ``t`` of the ranked detections (image, row): each
    takes the unmatched ground truth of its image with the highest IoU, if IoU >= t."""
    matched = {
        i: np.zeros(iou.shape[1], dtype=bool) for i, iou in ious_per_image.items()
    }
    tp = np.zeros(len(img), dtype=bool)
    for d in range(len(img)):
        iou = ious_per_image[img[d]][row[d]]
        if iou.size == 0:
            continue
        cand = np.where(matched[img[d]], -1.0, iou)
        g = int(np.argmax(cand))
        if cand[g] >= t:
            matched[img[d]][g] = True
            tp[d] = True
    return tp


# ---------------------------------------------------------------------------------------
# Segmentation: Dice
# ---------------------------------------------------------------------------------------


def dice_scores(pred_label_maps, gt_label_maps, classes: Sequence[int] = (1, 2)) -> dict:
    """Dice coefficient 2|A∩B| / (|A| + |B|) per lesion class from label maps.

    Args:
        pred_label_maps: sequence of int arrays [H, W] (one per image), 0 background,
            1 GGO, 2 consolidation.
        gt_label_maps: sequence of int arrays [H, W], same length and sizes.
        classes: class ids to score.

    Returns:
        dict: ``per_class`` {class_id (int): {"dice" (float, dataset-level: pixel
        counts summed over all images; NaN when the class is absent from both
        predictions and ground truth everywhere), "per_image_mean" (float, mean of the
        per-image Dice over images where the class is present in prediction or ground
        truth; NaN if there is none), "n_images" (int, images in that mean),
        "pred_pixels", "gt_pixels", "intersection" (int))}}, ``mean_dice`` (float,
        mean of dataset-level Dice over classes, NaN classes excluded) and
        ``mean_per_image_dice`` (float, same for the per-image means).

    Raises:
        ValueError: lists of different lengths, or a pair of maps of different shapes.
    """
    if len(pred_label_maps) != len(gt_label_maps):
        raise ValueError(
            f"pred_label_maps and gt_label_maps have different lengths: "
            f"{len(pred_label_maps)} != {len(gt_label_maps)}"
        )
    classes = [int(c) for c in classes]
    inter = {c: 0 for c in classes}
    psum = {c: 0 for c in classes}
    gsum = {c: 0 for c in classes}
    per_image: dict[int, list[float]] = {c: [] for c in classes}
    for i, (p, g) in enumerate(zip(pred_label_maps, gt_label_maps)):
        p = np.asarray(p)
        g = np.asarray(g)
        if p.shape != g.shape:
            raise ValueError(f"image {i}: prediction map {p.shape} vs ground truth {g.shape}")
        for c in classes:
            a = p == c
            b = g == c
            na, nb = int(a.sum()), int(b.sum())
            ni = int(np.logical_and(a, b).sum())
            inter[c] += ni
            psum[c] += na
            gsum[c] += nb
            if na + nb > 0:
                per_image[c].append(2.0 * ni / (na + nb))

    per_class = {}
    for c in classes:
        denom = psum[c] + gsum[c]
        per_class[c] = {
            "dice": 2.0 * inter[c] / denom if denom > 0 else math.nan,
            "per_image_mean": float(np.mean(per_image[c])) if per_image[c] else math.nan,
            "n_images": len(per_image[c]),
            "pred_pixels": psum[c],
            "gt_pixels": gsum[c],
            "intersection": inter[c],
        }

    def class_mean(key: str) -> float:
        vals = [per_class[c][key] for c in classes if not math.isnan(per_class[c][key])]
        return float(np.mean(vals)) if vals else math.nan

    return {
        "per_class": per_class,
        "mean_dice": class_mean("dice"),
        "mean_per_image_dice": class_mean("per_image_mean"),
    }


def _num(v: float, digits: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def format_segmentation_table(
    ap: Mapping | None, dice: Mapping | None, lesion_names: Sequence[str] = LESION_NAMES
) -> str:
    """Render :func:`mask_ap` and :func:`dice_scores` results as a plain-text table.

    Args:
        ap: dict from :func:`mask_ap`, or None to leave out the AP columns.
        dice: dict from :func:`dice_scores`, or None to leave out the Dice columns.
        lesion_names: names indexed by class id (default
            :data:`~ctmask.core.presets.LESION_NAMES`); ids beyond it are shown as
            ``class <id>``.

    Returns:
        Multi-line monospace text: one row per class (union of the classes of ``ap``
        and ``dice``) with GT / predicted instance counts, AP@[.50:.95], AP50, AP75,
        dataset Dice and mean per-image Dice (fractions, 4 decimals; "n/a" for NaN),
        then a "mean" row over classes.
    """
    if ap is None and dice is None:
        raise ValueError("nothing to format: both ap and dice are None")
    ids = []
    for src in (ap, dice):
        if src is not None:
            for c in src["per_class"]:
                if int(c) not in ids:
                    ids.append(int(c))

    def name(c: int) -> str:
        return lesion_names[c] if 0 <= c < len(lesion_names) else f"class {c}"

    header = ["lesion"]
    if ap is not None:
        header += ["n_gt", "n_pred", "AP@[.50:.95]", "AP50", "AP75"]
    if dice is not None:
        header += ["Dice", "Dice/image"]
    rows = []
    for c in ids:
        r = [name(c)]
        if ap is not None:
            pc = ap["per_class"].get(c)
            if pc is None:
                r += ["-", "-", "n/a", "n/a", "n/a"]
            else:
                r += [str(pc["n_gt"]), str(pc["n_pred"]), _num(pc["AP"]), _num(pc["AP50"]),
                      _num(pc["AP75"])]
        if dice is not None:
            dc = dice["per_class"].get(c)
            if dc is None:
                r += ["n/a", "n/a"]
            else:
                r += [_num(dc["dice"]), _num(dc["per_image_mean"])]
        rows.append(r)
    mean = ["mean"]
    if ap is not None:
        mean += ["", "", _num(ap["mAP"]), _num(ap["AP50"]), _num(ap["AP75"])]
    if dice is not None:
        mean += [_num(dice["mean_dice"]), _num(dice["mean_per_image_dice"])]
    rows.append(mean)
    return "\n".join(text_table(header, rows)) + "\n"
