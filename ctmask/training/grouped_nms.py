"""Grouped NMS with a static-shape result: ``ctmask::grouped_nms_keep``.

NMS runs independently for every (image, group) pair, where a group is an FPN level (RPN)
or a lesion class (ranked RoIs), and the result is a keep-mask of the input's shape rather
than a list of indices. It is a registered custom op so that ``torch.export`` keeps it
as one node; :mod:`ctmask.exporter.translations` lowers it to a single ONNX
``NonMaxSuppression`` whose batch axis is the (image, group) pair. That is both exact and
linear in the number of pairs: the coordinate-offset trick of ``batched_nms`` puts every
box of the batch into one NMS call, which costs O((B * K)^2) on the CPU and exceeds
TensorRT's per-call box limit for large batches.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import boxes as box_ops


@torch.library.custom_op("ctmask::grouped_nms_keep", mutates_args=())
def grouped_nms_keep(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Keep-mask of NMS done per image and per group.

    Args:
        boxes: float [B, G, K, 4] (x1, y1, x2, y2).
        scores: float [B, G, K]; candidates to ignore should carry ``-inf`` (they still
            come out True unless suppressed: mask them with their own validity).
        iou_threshold: IoU above which the lower-scored box of a pair is suppressed.

    Returns:
        bool [B, G, K], True where the candidate survives.
    """
    b, g, k = scores.shape
    flat_boxes, flat_scores = boxes.reshape(b * g, k, 4), scores.reshape(b * g, k)
    keep = torch.zeros(b * g, k, dtype=torch.bool, device=scores.device)
    for i in range(b * g):
        keep[i, box_ops.nms(flat_boxes[i], flat_scores[i], iou_threshold)] = True
    return keep.view(b, g, k)


@grouped_nms_keep.register_fake
def _grouped_nms_keep_fake(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    return torch.empty(scores.shape, dtype=torch.bool, device=scores.device)


def nms_keep(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """:func:`grouped_nms_keep` on detached inputs (NMS has no gradient)."""
    return torch.ops.ctmask.grouped_nms_keep(boxes.detach(), scores.detach(), float(iou_threshold))
