"""Evaluation: paper Table 2 for the classifier; mask AP and Dice for the detector."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ctmask.core.metrics import classification_report
from ctmask.core.noise import NOISE_GRAY_LEVELS, NoiseFloor
from ctmask.core.progress import progress
from ctmask.data.cncb import SegSample
from ctmask.data.covidx import SplitEntry
from ctmask.training.checkpoint import Checkpoint
from ctmask.training.datasets import ClassificationDataset, SegmentationDataset
from ctmask.training.detector import build_detector, segment
from ctmask.training.metrics import dice_scores, mask_ap
from ctmask.training.model import CovidCTMaskNet, load_state, load_weights
from ctmask.training.options import require_at_least
from ctmask.training.roi_cache import cache_key, cached_rois
from ctmask.training.train_cls import ranked_rois_of


def load_classifier(ck: Checkpoint) -> CovidCTMaskNet:
    """Eval-mode COVID-CT-Mask-Net from a classifier checkpoint."""
    model = CovidCTMaskNet(ck.preset)
    load_weights(model, ck.model, ck.path)
    return model.eval()


def evaluate_classifier(
    ck: Checkpoint, entries: list[SplitEntry], batch_size: int = 8, crop: bool = False, show_progress: bool = True,
    noise_levels: tuple[float, ...] = NOISE_GRAY_LEVELS, roi_cache: str | Path | None = None,
) -> dict:
    """Classify every slice of a split; return the Table 2 report plus per-slice predictions.

    The detector's ranked RoIs are computed split by split (decoded slices are not kept),
    then the head classifies them. With ``noise_levels`` (default +-0.25 and +-1 gray level),
    the RoIs of the slices with seeded input noise of each amplitude are classified too
    (:mod:`ctmask.core.noise`), and the report's ``noise_floor`` counts the calls the noise
    changed; ``()`` skips that. ``roi_cache``: a folder of cached RoIs
    (:mod:`ctmask.training.roi_cache`): a second head on the same detector and slices is
    evaluated without running the detector again.

    Raises:
        ConfigError: ``batch_size`` < 1.
    """
    require_at_least("batch size", batch_size)
    model = load_classifier(ck)
    data = ClassificationDataset(entries, model.preset.image_size, crop, cache_bytes=0)
    rois = {}
    for level in (0.0, *noise_levels):
        def key() -> str:
            return cache_key(model.detector, model.preset, entries, crop, (), 0, batch_size,
                             {"noise_gray_levels": level, "noise_seed": 0})

        rois[level] = cached_rois(roi_cache, key, lambda: ranked_rois_of(model, data, batch_size, show_progress,
                                                                         gray_levels=level),
                                  len(entries), model.preset.n_rois).tensors[0]
    with torch.no_grad():
        logits = {level: model.classifier(r) for level, r in rois.items()}
    probs = torch.softmax(logits[0.0], -1)
    y_pred = logits[0.0].argmax(-1).numpy()
    y_true = np.array([e.label for e in entries])
    report = classification_report(y_true, y_pred)
    report["head"] = ck.preset.head
    if noise_levels:
        floor = NoiseFloor(noise_levels)
        floor.add(logits[0.0].numpy(), {lv: logits[lv].numpy() for lv in noise_levels})
        report["noise_floor"] = floor.to_dict()
    report["predictions"] = [
        {"file": str(e.path), "label": int(e.label), "pred": int(p), "probs": [round(float(v), 6) for v in pr]}
        for e, p, pr in zip(entries, y_pred, probs.numpy())
    ]
    return report


def label_map_of(det: dict[str, torch.Tensor], size: int, score_thresh: float = 0.5) -> np.ndarray:
    """Detections -> lesion label map [S, S] (0 bg, 1 GGO, 2 consolidation).

    Pixels with mask probability >= 0.5 of a detection scoring >= ``score_thresh`` take its
    class; where detections overlap the higher score wins.
    """
    out = np.zeros((size, size), dtype=np.uint8)
    best = np.zeros((size, size), dtype=np.float32)
    for m, s, lab in zip(det["masks"][:, 0].numpy(), det["scores"].numpy(), det["labels"].numpy()):
        if s < score_thresh:
            continue
        sel = (m >= 0.5) & (s > best)
        out[sel], best[sel] = lab, s
    return out


@torch.no_grad()
def evaluate_segmentation(
    ck: Checkpoint, samples: list[SegSample], batch_size: int = 4, show_progress: bool = True
) -> dict:
    """Mask AP over IoU 0.50:0.95 and Dice per lesion class at the model's input size.

    Raises:
        ConfigError: ``batch_size`` < 1.
    """
    require_at_least("batch size", batch_size)
    detector = build_detector(ck.preset)
    load_state(detector, ck.model, ck.path)
    detector.eval()
    size = ck.preset.image_size
    data = SegmentationDataset(samples, size, mask_type=ck.preset.mask_type)
    preds, gts, pred_maps = [], [], []
    with progress(len(data), "evaluate-seg", show_progress) as advance:
        for start in range(0, len(data), batch_size):
            items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
            dets = segment(detector, torch.stack([im for im, _ in items]))
            for (_, tgt), det in zip(items, dets):
                masks = det["masks"][:, 0].numpy() >= 0.5
                preds.append({"masks": masks, "scores": det["scores"].numpy(), "labels": det["labels"].numpy()})
                gts.append({"masks": tgt["masks"].numpy().astype(bool), "labels": tgt["labels"].numpy()})
                pred_maps.append(label_map_of(det, size))
            advance(len(items))
    # Dice is measured against the full lesion masks, small components included.
    gt_maps = [data.label_map(i) for i in range(len(data))]
    lesion_classes = tuple(range(1, ck.preset.num_lesion_classes))
    return {"mask_ap": mask_ap(preds, gts), "dice": dice_scores(pred_maps, gt_maps, classes=lesion_classes),
            "n": len(samples)}
