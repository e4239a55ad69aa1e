"""Lesion detections for readers: the paper's segmentation-inference rule on the ranked rows (torch-free).

The graph's ranked rows are S's input, not detections: one row per (proposal, lesion class)
pair that survived the classifier-side rule (score > ``cls_score_thresh``, NMS at
``cls_nms_thresh`` = 0.75 per class, top N), so neighbouring rows overlap heavily. What a
reader sees (overlays, the HTML report, the DICOM SR and presentation state) is the rule the
paper's Mask R-CNN uses when it segments lesions (torchvision's ``box_score_thresh``,
``box_nms_thresh``, ``box_detections_per_img``): rows scoring above :data:`SCORE_THRESHOLD`
whose box is at least :data:`MIN_SIZE` wide and high (``remove_small_boxes``), greedy NMS at
IoU :data:`NMS_IOU` within each lesion class, at most :data:`MAX_DETECTIONS`, highest score first.
Since the rows are the top N after NMS 0.75, the detections are the
segmentation rule applied to those N rows (a candidate the 0.75 NMS or the top-N cut dropped
cannot come back; one the 0.5 NMS drops was a row). A graph whose ranked RoIs use matrix
suppression (``ctmask.roi_suppression`` = ``matrix``) keeps every candidate instead of the 0.75
NMS, its row scores decayed by their overlaps: its detections are the same rule on those rows and
decayed scores, so an overlapped box near :data:`SCORE_THRESHOLD` can fall below it.

The lesion class of a row is the graph's ``labels`` output where the graph has one (1 GGO,
2 consolidation: the detector's classes, :data:`LESION_NAMES`); a graph without it (exported
before the output existed) gives unlabelled ``lesion`` detections, and its NMS runs over
all rows as one class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCORE_THRESHOLD = 0.05
"""Detection scores must exceed it (torchvision's ``box_score_thresh`` default, the paper's;
torchvision keeps ``score > box_score_thresh``)."""
MIN_SIZE = 1e-2
"""Smallest box width and height kept, in the boxes' pixels (torchvision's ``remove_small_boxes``
in ``postprocess_detections``): a box clipped to a line at the image border is no detection."""
NMS_IOU = 0.5
"""IoU above which the lower-scored of two same-class boxes is dropped (``box_nms_thresh``)."""
MAX_DETECTIONS = 100
"""Most detections per slice (``box_detections_per_img``)."""
LESION_NAMES: dict[int, str] = {1: "GGO", 2: "consolidation"}
"""The detector's lesion classes by label id (training's masks: 1 GGO, 2 consolidation)."""
UNLABELLED = "lesion"
"""The class name of a detection from a graph that gives no row labels."""


@dataclass(frozen=True)
class Detection:
    """One lesion detection: ``box`` (x1, y1, x2, y2) in the frame of the boxes given (model
    input or source pixels), ``score`` in (0, 1], ``lesion`` (GGO, consolidation or lesion)."""

    box: tuple[float, float, float, float]
    score: float
    lesion: str

    def to_dict(self) -> dict:
        return {"box": [round(float(v), 2) for v in self.box], "score": round(float(self.score), 6),
                "lesion": self.lesion}


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression: indices kept, highest score first.

    Args:
        boxes: float [K, 4] (x1, y1, x2, y2); scores: float [K]; iou: suppression threshold
            (a box whose IoU with a kept, higher-scored box exceeds it is dropped).
    """
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    area = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.clip(np.minimum(b[i, 2], b[rest, 2]) - np.maximum(b[i, 0], b[rest, 0]), 0, None)
        h = np.clip(np.minimum(b[i, 3], b[rest, 3]) - np.maximum(b[i, 1], b[rest, 1]), 0, None)
        inter = w * h
        union = area[i] + area[rest] - inter
        overlap = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[overlap <= iou]
    return np.asarray(keep, np.int64)


def lesion_name(label: int | None) -> str:
    """The lesion class of a row label (``None``: the graph gives none)."""
    return UNLABELLED if label is None else LESION_NAMES.get(int(label), f"class {int(label)}")


def detect(scores: np.ndarray, boxes: np.ndarray, labels: np.ndarray | None = None,
           score_threshold: float = SCORE_THRESHOLD, iou: float = NMS_IOU,
           max_detections: int = MAX_DETECTIONS) -> list[Detection]:
    """The lesion detections of one slice's ranked rows (the module docstring's rule).

    Args:
        scores: float [N], the rows' scores (column 0 of ``rois``; 0 = padding row).
        boxes: float [N, 4], the rows' boxes in any pixel frame (the detections keep it).
        labels: int-valued [N], each row's lesion class id, or None (unlabelled rows).

    Returns:
        at most ``max_detections`` detections, highest score first.

    Raises:
        ValueError: arrays that do not line up.
    """
    given = np.asarray(scores)
    s = given.astype(np.float64).reshape(-1)
    # the threshold in the scores' own precision, as torchvision compares (float32 0.05 is not above 0.05)
    threshold = float(np.asarray(score_threshold, given.dtype if given.dtype.kind == "f" else np.float64))
    b = np.asarray(boxes, np.float64).reshape(-1, 4) if np.size(boxes) else np.zeros((0, 4))
    if len(b) != len(s) or (labels is not None and np.size(labels) != len(s)):
        raise ValueError(f"{len(s)} scores, {len(b)} boxes and {'no' if labels is None else np.size(labels)} labels "
                         "do not line up")
    lab = None if labels is None else np.rint(np.asarray(labels, np.float64).reshape(-1)).astype(np.int64)
    with np.errstate(invalid="ignore"):
        ok = (s > threshold) & np.isfinite(s) & np.isfinite(b).all(1)
        ok &= (b[:, 2] - b[:, 0] >= MIN_SIZE) & (b[:, 3] - b[:, 1] >= MIN_SIZE)
    groups = np.zeros(len(s), np.int64) if lab is None else lab
    kept: list[int] = []
    for g in np.unique(groups[ok]):
        idx = np.flatnonzero(ok & (groups == g))
        kept.extend(idx[nms(b[idx], s[idx], iou)].tolist())
    kept.sort(key=lambda i: (-s[i], i))
    return [Detection((float(b[i, 0]), float(b[i, 1]), float(b[i, 2]), float(b[i, 3])), float(s[i]),
                      lesion_name(None if lab is None else int(lab[i]))) for i in kept[:max_detections]]
