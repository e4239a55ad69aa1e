"""ONNX lowerings of ctmask's custom ops, passed to ``torch.onnx.export`` as its
``custom_translation_table``.

Functions are traced by onnxscript: python numbers and lists become constants.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from onnxscript import opset18 as op
from onnxscript.onnx_types import BOOL, FLOAT

from ctmask.training import grouped_nms  # noqa: F401  (registers torch.ops.ctmask.*)

_INT64_MAX = 0x7FFFFFFFFFFFFFFF


def grouped_nms_keep(boxes: FLOAT, scores: FLOAT, iou_threshold: float) -> BOOL:
    """``ctmask::grouped_nms_keep`` as one ``NonMaxSuppression`` over B * G batches.

    boxes [B, G, K, 4], scores [B, G, K] -> bool [B, G, K]. The selected
    (batch, class, box) triples are scattered into a zero mask of B * G * K entries.
    """
    shape = op.Shape(scores)  # [B, G, K]
    k = op.Shape(scores, start=2, end=3)
    pairs = op.ReduceProd(op.Shape(scores, start=0, end=2), keepdims=1)
    flat_boxes = op.Reshape(boxes, op.Concat(pairs, k, op.Constant(value_ints=[4]), axis=0))
    flat_scores = op.Unsqueeze(op.Reshape(scores, op.Concat(pairs, k, axis=0)), [1])
    selected = op.NonMaxSuppression(flat_boxes, flat_scores, _INT64_MAX, iou_threshold)  # [S, 3]
    pair = op.Squeeze(op.Slice(selected, [0], [1], [1]), [1])
    box = op.Squeeze(op.Slice(selected, [2], [3], [1]), [1])
    flat_index = op.Add(op.Mul(pair, k), box)
    total = op.ReduceProd(shape, keepdims=1)
    zeros = op.Expand(op.Constant(value_float=0.0), total)
    ones = op.Expand(op.Constant(value_float=1.0), op.Shape(flat_index))
    mask = op.ScatterElements(zeros, flat_index, ones, axis=0)
    return op.Reshape(op.Cast(mask, to=BOOL.dtype), shape)


def translation_table() -> dict[Callable, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export``."""
    return {torch.ops.ctmask.grouped_nms_keep.default: grouped_nms_keep}
