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


def matrix_suppression(boxes: Tensor, scores: Tensor, sigma: float) -> Tensor:
    """Scores after Gaussian matrix NMS (SOLOv2), done per image and per group, static shapes.

    Every candidate's score is multiplied by ``min_j exp(-(IoU(j, i)^2 - c_j^2) / sigma)`` over
    the candidates ``j`` ranked above it in its group, where ``c_j`` is ``j``'s own largest
    IoU with a candidate above ``j`` (a box that is itself suppressed suppresses less). Unlike
    hard NMS nothing is dropped at a threshold: a score moves continuously with the overlaps.
    What stays discontinuous is which of two overlapping near-equal boxes is "above" (and so
    decays the other), as NMS's choice of which one to keep is.

    "Above" is ``s_j > s_i``, or ``s_j == s_i`` and ``j`` earlier in the input: computed
    elementwise in the input's order, with no sort, so every backend breaks exact ties (flat
    slices, INT8's quantized scores) the same way. The decay is a constant to autograd (as
    NMS's choice is): gradients reach the scores, never the boxes through the IoU.

    Args:
        boxes: float [B, G, K, 4] (x1, y1, x2, y2).
        scores: float [B, G, K]; ``-inf`` marks candidates to ignore (they neither suppress
            nor are kept: they come out ``-inf``).
        sigma: the Gaussian's width; smaller suppresses harder.

    Returns:
        float [B, G, K]: the decayed scores, in the input's candidate order.
    """
    k = scores.shape[-1]
    bx, s = boxes.detach(), scores.detach()
    area = (bx[..., 2] - bx[..., 0]).clamp(min=0) * (bx[..., 3] - bx[..., 1]).clamp(min=0)
    lt = torch.maximum(bx[..., :, None, :2], bx[..., None, :, :2])
    rb = torch.minimum(bx[..., :, None, 2:], bx[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area[..., :, None] + area[..., None, :] - inter
    ok = s > float("-inf")
    # above[.., j, i]: candidate j ranks above candidate i (ties: the earlier one).
    earlier = torch.ones(k, k, dtype=torch.bool, device=scores.device).triu(1)
    sj, si = s[..., :, None], s[..., None, :]
    above = (sj > si) | ((sj == si) & earlier)
    pair = above & ok[..., :, None] & ok[..., None, :]
    iou = torch.where(pair & (union > 0), inter / union.clamp(min=1e-9), torch.zeros_like(inter))
    comp = iou.amax(-2)  # [.., j]: j's largest IoU with a candidate above it
    decay = torch.exp(-(iou * iou - (comp * comp).unsqueeze(-1)) / sigma).amin(-2)
    return torch.where(ok, scores * decay, scores)  # -inf stays -inf (never -inf * 0)
