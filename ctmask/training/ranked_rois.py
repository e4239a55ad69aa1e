"""Fixed-shape inference post-processing: image batch -> ranked RoI tensor [B, N, 5].

Every tensor after the backbone has a static shape except the batch: where torchvision
drops elements with boolean indexing, this module keeps them and carries a validity mask;
NMS results are scattered into a keep-mask of fixed size, and selection is ``where`` +
``topk``. The same code therefore exports with ``torch.onnx.export(..., dynamo=True)``
to a graph in which only the batch dimension is symbolic.

Ranked RoI rows are ``(score, dx, dy, dw, dh)``: the softmax score of one non-background
class (with ``roi_suppression="matrix"``, that score after the matrix decay) and that class's
*encoded* box-regression output (box coder weights 10, 10, 5, 5), highest score first.
**Padding:** when fewer than N candidates survive (thresholds, NMS,
degenerate boxes), the remaining rows are all zeros. A zero row is never produced by a real
candidate (softmax scores are > 0), so padding is unambiguous and deterministic.

With ``with_boxes=True`` the module also returns each ranked row's *decoded* box
``(x1, y1, x2, y2)`` [B, N, 4] in model-input pixels (the deltas applied to the row's
proposal, clipped to the image: the box NMS judged), zeros for padding rows. S never reads
them; the exported graph outputs them so a user can see where a RoI lies.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection import MaskRCNN
from torchvision.ops import boxes as box_ops
from torchvision.ops import roi_align

from ctmask.core.presets import Preset
from ctmask.training.detector import FPN_STRIDES, fixed_anchors, normalize
from ctmask.training.grouped_nms import matrix_suppression, nms_keep

NEG_INF = float("-inf")


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """``x`` [B, K, D], ``idx`` [B, M] -> [B, M, D]."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def level_mapper_levels(boxes: Tensor, k_min: int, k_max: int) -> Tensor:
    """FPN level index (0-based) of each box, as torchvision's ``LevelMapper`` assigns it.

    Args:
        boxes: float [..., 4]. Returns int64 [...] in [0, k_max - k_min].
    """
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    s = torch.sqrt(area)
    lvl = torch.floor(4 + torch.log2(s / 224.0) + 1e-6)
    return (torch.clamp(lvl, min=k_min, max=k_max) - k_min).to(torch.int64)


class RankedRoIs(nn.Module):
    """Detector inference producing the ranked RoI batch, with static shapes.

    Shares (does not copy) the submodules of a torchvision Mask R-CNN built by
    :func:`ctmask.training.detector.build_detector`.

    Args:
        detector: the Mask R-CNN.
        preset: supplies image size, RPN top-N and min size, NMS / score thresholds and N.
    """

    def __init__(self, detector: MaskRCNN, preset: Preset):
        super().__init__()
        self.backbone = detector.backbone
        self.rpn_head = detector.rpn.head
        self.box_head = detector.roi_heads.box_head
        self.box_predictor = detector.roi_heads.box_predictor
        self.rpn_coder = detector.rpn.box_coder
        self.box_coder = detector.roi_heads.box_coder
        self.preset = preset
        self.image_size = preset.image_size
        self.strides = preset.feature_strides
        self.register_buffer("anchors", fixed_anchors(detector, preset.image_size, self.strides), persistent=False)
        a = preset.anchors_per_location
        self.level_sizes = [a * (preset.image_size // s) ** 2 for s in self.strides]
        self.k_min = int(math.log2(self.strides[0]))
        self.k_max = int(math.log2(self.strides[-1]))

    def proposals(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        """RPN proposals [B, P, 4] and their validity [B, P] (P = post-NMS top-N)."""
        p = self.preset
        objectness, deltas = self.rpn_head(features)
        b = features[0].shape[0]
        obj = torch.cat([o.permute(0, 2, 3, 1).reshape(b, -1) for o in objectness], 1)
        dl = torch.cat(
            [d.view(b, -1, 4, d.shape[-2], d.shape[-1]).permute(0, 3, 4, 1, 2).reshape(b, -1, 4) for d in deltas], 1
        )
        # Per-level top-k on raw objectness, as torchvision's RPN does; the levels are
        # padded to a common k (with -inf scores) so NMS can run per (image, level).
        k = max(min(p.rpn_pre_nms_top_n_test, n) for n in self.level_sizes)
        idx, start = [], 0
        for n in self.level_sizes:
            top = obj[:, start : start + n].topk(min(k, n), dim=1).indices + start
            if top.shape[1] < k:
                top = torch.cat([top, top.new_full((b, k - top.shape[1]), -1)], 1)
            idx.append(top)
            start += n
        idx = torch.stack(idx, 1)  # [B, L, k], -1 = padding
        pad = idx < 0
        idx = idx.clamp(min=0).reshape(b, -1)
        scores = torch.sigmoid(torch.gather(obj, 1, idx))
        anchors = self.anchors[idx.reshape(-1)]
        boxes = self.rpn_coder.decode_single(gather_rows(dl, idx).reshape(-1, 4), anchors)
        boxes = box_ops.clip_boxes_to_image(boxes, (self.image_size, self.image_size)).view(b, -1, 4)
        # torchvision's remove_small_boxes with the preset's min size: 0.0 (paper, as the
        # reference) keeps zero-area proposals; they cannot suppress or be suppressed in
        # NMS (IoU 0) and the heads' 1e-2 filter in forward drops their decoded boxes.
        w, h = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        valid = (w >= p.rpn_min_size) & (h >= p.rpn_min_size)
        valid = valid & ~pad.reshape(b, -1)
        scores = torch.where(valid, scores, NEG_INF)
        n_levels = len(self.level_sizes)
        keep = nms_keep(boxes.view(b, n_levels, k, 4), scores.view(b, n_levels, k), p.rpn_nms_thresh)
        ranked = torch.where(keep.view(b, -1) & valid, scores, NEG_INF)
        top = ranked.topk(min(p.rpn_post_nms_top_n_test, ranked.shape[1]), dim=1)
        return gather_rows(boxes, top.indices), top.values > NEG_INF

    def roi_features(self, features: list[Tensor], boxes: Tensor) -> Tensor:
        """Multi-scale RoIAlign 7x7 of ``boxes`` [B, P, 4] -> [B * P, C, 7, 7].

        Each box is pooled from the FPN level torchvision's ``LevelMapper`` assigns, as
        ``MultiScaleRoIAlign`` does.
        """
        b, n = boxes.shape[:2]
        batch_idx = torch.arange(b, device=boxes.device, dtype=boxes.dtype).view(b, 1, 1).expand(b, n, 1)
        rois = torch.cat([batch_idx, boxes], -1).reshape(-1, 5)
        if len(features) == 1:  # one FPN level (lightweight presets): every box pools from it
            return roi_align(features[0], rois, (7, 7), spatial_scale=1.0 / self.strides[0], sampling_ratio=2,
                             aligned=False)
        levels = level_mapper_levels(boxes.reshape(-1, 4), self.k_min, self.k_max)
        if torch.compiler.is_exporting():
            return self._roi_features_static(features, rois, levels, self.strides)
        # Eager: pool each box once, at its own level (data-dependent sizes).
        out = rois.new_zeros(rois.shape[0], features[0].shape[1], 7, 7)
        for i, (feat, stride) in enumerate(zip(features, self.strides)):
            idx = torch.nonzero(levels == i).squeeze(1)
            pooled = roi_align(feat, rois[idx], (7, 7), spatial_scale=1.0 / stride, sampling_ratio=2, aligned=False)
            out = out.index_copy(0, idx, pooled)
        return out

    @staticmethod
    def _roi_features_static(features: list[Tensor], rois: Tensor, levels: Tensor,
                             strides: tuple[int, ...] = FPN_STRIDES) -> Tensor:
        """Export-only form of :meth:`roi_features`, with no data-dependent shape.

        The FPN levels are laid side by side on one canvas and every box is moved into
        its own level's region (scaled by 1 / stride, shifted by the region's x offset), so
        a single RoIAlign at scale 1 pools each box once. Each region gets one replicated
        column and replicated rows down to the canvas height, in one edge Pad: RoIAlign
        clamps samples in (H - 1, H] to row H - 1, and interpolating towards a copy of
        that row gives the same value; a box of at least one feature pixel reads the rows
        past H with weight 0 only, as a clipped box's samples lie in [0, H].

        The one exception: a box narrower than one feature pixel (RoIAlign widens it to one
        pixel) lying on the far edge samples beyond its region. The eager form reads zeros
        there; the canvas reads its neighbour region, and where that neighbour (a coarser
        level, fewer rows) is shorter than the canvas, its replicated edge rows (zeros
        before the one-Pad form). Only finest-level boxes can be that small (coarser
        levels take boxes of at least 112 px in sqrt(area): at least one feature pixel on
        images up to 1568 px), and only at the right edge of the image.
        """
        height = features[0].shape[-2] + 1
        regions, offsets, x = [], [], 0
        for feat in features:
            # One Pad per level (its copy of the level is the canvas's biggest cost after
            # RoIAlign itself: ~7% of an INT8 graph's CPU time with a Pad + a zero Pad).
            region = F.pad(feat, (0, 1, 0, height - feat.shape[-2]), mode="replicate")
            regions.append(region)
            offsets.append(float(x))
            x += region.shape[-1]
        canvas = torch.cat(regions, -1)
        scale = rois.new_tensor([1.0 / s for s in strides])[levels].unsqueeze(-1)
        shift = rois.new_tensor(offsets)[levels]
        zero = torch.zeros_like(shift)
        boxes = rois[:, 1:] * scale + torch.stack([shift, zero, shift, zero], -1)
        moved = torch.cat([rois[:, :1], boxes], -1)
        return roi_align(canvas, moved, (7, 7), spatial_scale=1.0, sampling_ratio=2, aligned=False)

    def forward(self, images: Tensor, n_rows: int | None = None, with_boxes: bool = False,
                with_labels: bool = False) -> Tensor | tuple[Tensor, ...]:
        """Ranked RoIs of a batch.

        Args:
            images: float32 [B, 1, S, S], lung-window grayscale in [0, 1].
            n_rows: rows to return (default: the preset's N). Parity's reference asks for
                more than N, so a candidate that another backend ranks into the last
                rows can be matched to the reference candidate it really is.
            with_boxes: also return the decoded box of every row.
            with_labels: (with ``with_boxes``) also return every row's lesion class id.

        Returns:
            float32 [B, n_rows, 5] rows ``(score, dx, dy, dw, dh)``, highest score first,
            zero rows as padding; with ``with_boxes``, also float32 [B, n_rows, 4] ``(x1, y1, x2,
            y2)`` in input pixels, clipped to [0, S], same rows, zeros for padding; with
            ``with_labels``, also float32 [B, n_rows] each row's detector class id (1 GGO, 2
            consolidation; 0 for padding).
        """
        p = self.preset
        n_rows = n_rows or p.n_rois
        feats = self.backbone(normalize(images))
        features = [feats[str(i)] for i in range(len(self.strides))]
        proposals, prop_valid = self.proposals(features)
        b, n_prop = prop_valid.shape
        box_feats = self.box_head(self.roi_features(features, proposals))
        class_logits, box_regression = self.box_predictor(box_feats)
        n_cls = class_logits.shape[-1]
        scores = torch.softmax(class_logits, -1).view(b, n_prop, n_cls)[..., 1:]
        deltas = box_regression.view(b, n_prop, n_cls, 4)[..., 1:, :]
        boxes = self.box_coder.decode_single(box_regression, proposals.reshape(-1, 4))
        boxes = box_ops.clip_boxes_to_image(boxes.view(-1, 4), (self.image_size, self.image_size))
        boxes = boxes.view(b, n_prop, n_cls, 4)[..., 1:, :]
        # Candidates: one per (proposal, non-background class), proposal-major order.
        n_fg = n_cls - 1
        m = n_prop * n_fg
        wh_ok = ((boxes[..., 2] - boxes[..., 0]) >= 1e-2) & ((boxes[..., 3] - boxes[..., 1]) >= 1e-2)
        valid = prop_valid.unsqueeze(-1) & wh_ok & (scores > p.cls_score_thresh)  # [B, P, C']
        masked = torch.where(valid, scores, NEG_INF)
        # Suppression per (image, class): classes become the group axis.
        if p.roi_suppression == "matrix":
            # Continuous: every valid candidate stays, its score (the row's and the ranking's)
            # decayed by its overlap with higher-scored boxes of its class.
            decayed = matrix_suppression(boxes.transpose(1, 2), masked.transpose(1, 2),
                                         p.roi_suppression_sigma).transpose(1, 2)
            ranked = decayed.reshape(b, m)
            scores = torch.where(valid, decayed, torch.zeros_like(decayed)).reshape(b, m)
        else:
            keep = nms_keep(boxes.transpose(1, 2), masked.transpose(1, 2), p.cls_nms_thresh).transpose(1, 2)
            keep = (keep & valid).reshape(b, m)
            scores = scores.reshape(b, m)
            ranked = torch.where(keep, scores, NEG_INF)
        deltas = deltas.reshape(b, m, 4)
        if m < n_rows:
            ranked = torch.cat([ranked, ranked.new_full((b, n_rows - m), NEG_INF)], 1)
            scores = torch.cat([scores, scores.new_zeros(b, n_rows - m)], 1)
            deltas = torch.cat([deltas, deltas.new_zeros(b, n_rows - m, 4)], 1)
        top = ranked.topk(n_rows, dim=1)
        real = (top.values > NEG_INF).unsqueeze(-1)
        rows = gather_rows(torch.cat([scores.unsqueeze(-1), deltas], -1), top.indices)
        rows = torch.where(real, rows, torch.zeros_like(rows))
        if not with_boxes:
            return rows
        # The same candidates' decoded boxes (candidate order as scores / deltas), same rows.
        decoded = boxes.reshape(b, m, 4)
        if m < n_rows:
            decoded = torch.cat([decoded, decoded.new_zeros(b, n_rows - m, 4)], 1)
        located = gather_rows(decoded, top.indices)
        located = torch.where(real, located, torch.zeros_like(located))
        if not with_labels:
            return rows, located
        # Candidate c is (proposal c // n_fg, class c % n_fg + 1): its class id read from a
        # constant by the rows' indices (a Gather, no integer arithmetic in the graph).
        ids = torch.arange(1, n_fg + 1, device=images.device, dtype=rows.dtype).repeat(n_prop)
        if m < n_rows:
            ids = torch.cat([ids, ids.new_zeros(n_rows - m)])
        labels = gather_rows(ids.view(1, -1, 1).expand(b, -1, 1), top.indices).squeeze(-1)
        return rows, located, torch.where(real.squeeze(-1), labels, torch.zeros_like(labels))
