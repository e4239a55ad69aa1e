"""The lesion detector: a torchvision Mask R-CNN configured from a :class:`Preset`.

The backbone is a ResNet body cut after ``preset.kept_stages`` stages with a one-level-per-stage
FPN on its last ``preset.fpn_levels`` stages (never an extra max-pool level).

Paper preset: ResNet50 with plain BatchNorm2d (no ImageNet weights), FPN on layer1..layer4
with 256 channels and 4 levels (no extra max-pool level), 30 anchors per location on every
level, RPN NMS 0.75 with min size 0 (zero-area proposals are kept, as in the reference),
box head 12544 -> 128 -> 128, box coder weights (10, 10, 5, 5), 3 classes (background,
GGO, consolidation), mask head of four 256-channel convolutions.

Lightweight presets (``resnet18-t1``, ``resnet34-t1``): ResNet18 / 34 ending at layer3, one FPN
level on it (stride 16, 256 in and out channels), mask head of one 128-channel convolution,
2 classes (background, lesion).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from ctmask.core.presets import IMAGENET_MEAN, IMAGENET_STD, Preset

FPN_STRIDES: tuple[int, ...] = (4, 8, 16, 32)
"""Output strides of ResNet layer1..layer4, i.e. of the paper preset's four FPN levels (a
preset's own levels: :attr:`~ctmask.core.presets.Preset.feature_strides`)."""


def build_backbone(preset: Preset) -> BackboneWithFPN:
    """ResNet body (plain BatchNorm2d, random init) + FPN without extra levels.

    The body keeps ``preset.kept_stages`` stages (``IntermediateLayerGetter`` stops at the last
    returned layer, so the truncated stages, pooling and fc are not part of the model); FPN
    level ``i`` (output ``str(i)``) reads stage ``preset.fpn_stages[i]`` with that stage's width
    as its in-channels.
    """
    block = Bottleneck if preset.bottleneck else BasicBlock
    resnet = ResNet(block, list(preset.backbone_blocks), norm_layer=nn.BatchNorm2d)
    backbone = BackboneWithFPN(
        resnet,
        return_layers={f"layer{s + 1}": str(i) for i, s in enumerate(preset.fpn_stages)},
        in_channels_list=[64 * 2**s * block.expansion for s in preset.fpn_stages],
        out_channels=preset.fpn_channels,
    )
    # BackboneWithFPN always appends a max-pool level; the reference's FPN has none.
    backbone.fpn.extra_blocks = None
    assert isinstance(backbone.body, IntermediateLayerGetter)
    return backbone


def build_detector(preset: Preset) -> MaskRCNN:
    """Build the Mask R-CNN of ``preset`` (random weights, training mode)."""
    c = preset.fpn_channels
    n_anchors = preset.anchors_per_location
    levels = preset.fpn_levels
    mc = preset.mask_head_channels
    detector = MaskRCNN(
        build_backbone(preset),
        num_classes=None,
        min_size=preset.image_size,
        max_size=preset.image_size,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        rpn_anchor_generator=AnchorGenerator(
            sizes=(tuple(preset.anchor_sizes),) * levels,
            aspect_ratios=(tuple(preset.aspect_ratios),) * levels,
        ),
        rpn_head=RPNHead(c, n_anchors),
        rpn_pre_nms_top_n_train=preset.rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=preset.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=preset.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=preset.rpn_post_nms_top_n_test,
        rpn_nms_thresh=preset.rpn_nms_thresh,
        rpn_fg_iou_thresh=preset.rpn_fg_iou_thresh,
        rpn_bg_iou_thresh=preset.rpn_bg_iou_thresh,
        rpn_batch_size_per_image=preset.rpn_batch_size_per_image,
        box_head=TwoMLPHead(c * 7 * 7, preset.box_representation),
        box_predictor=FastRCNNPredictor(preset.box_representation, preset.num_lesion_classes),
        box_score_thresh=preset.seg_score_thresh,
        box_nms_thresh=preset.seg_nms_thresh,
        box_detections_per_img=preset.seg_detections,
        box_batch_size_per_image=preset.box_batch_size_per_image,
        bbox_reg_weights=preset.box_coder_weights,
        mask_head=MaskRCNNHeads(c, (mc,) * preset.mask_head_layers, 1),
        mask_predictor=MaskRCNNPredictor(mc, mc, preset.num_lesion_classes),
    )
    # Not a MaskRCNN argument; torchvision's RPN defaults to 1e-3, the reference uses 0.
    # Zero-area proposals are safe downstream: their IoU with any box is 0 (never a
    # positive, so their infinite regression targets never reach a loss), RoIAlign
    # pools at least one pixel, and the heads drop decoded boxes under 1e-2.
    detector.rpn.min_size = preset.rpn_min_size
    return detector


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Grayscale [B, 1, H, W] in [0, 1] -> ImageNet-normalised [B, 3, H, W] float32."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images.expand(-1, 3, -1, -1) - mean) / std


def image_list(x: torch.Tensor) -> ImageList:
    """Wrap a same-sized batch [B, C, H, W] for torchvision's RPN / RoI heads."""
    h, w = x.shape[-2:]
    return ImageList(x, [(int(h), int(w))] * x.shape[0])


def detector_losses(
    detector: MaskRCNN, images: torch.Tensor, targets: list[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """The five Mask R-CNN training losses for a batch.

    Args:
        detector: model in training mode.
        images: float32 [B, 1, S, S] in [0, 1], S = preset image size.
        targets: per image ``boxes`` float32 [K, 4] (x1, y1, x2, y2 pixels), ``labels``
            int64 [K] in {1, 2}, ``masks`` uint8 [K, S, S].

    Returns:
        ``loss_objectness``, ``loss_rpn_box_reg``, ``loss_classifier``, ``loss_box_reg``,
        ``loss_mask`` (scalars).
    """
    x = normalize(images)
    il = image_list(x)
    features = detector.backbone(x)
    proposals, rpn_losses = detector.rpn(il, features, targets)
    _, roi_losses = detector.roi_heads(features, proposals, il.image_sizes, targets)
    return {**rpn_losses, **roi_losses}


@torch.no_grad()
def segment(detector: MaskRCNN, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Segmentation inference (score 0.05, NMS 0.5, 100 detections; model in eval mode).

    Returns, per image, ``boxes`` [K, 4], ``labels`` [K], ``scores`` [K] and ``masks``
    float32 [K, 1, S, S] probabilities pasted into the image.
    """
    x = normalize(images)
    il = image_list(x)
    features = detector.backbone(x)
    proposals, _ = detector.rpn(il, features)
    detections, _ = detector.roi_heads(features, proposals, il.image_sizes)
    return detector.transform.postprocess(detections, il.image_sizes, il.image_sizes)


def fixed_anchors(detector: MaskRCNN, image_size: int, strides: tuple[int, ...] = FPN_STRIDES) -> torch.Tensor:
    """All anchors of a square ``image_size`` input, float32 [A, 4] (x1, y1, x2, y2).

    ``strides``: the FPN levels' output strides (the preset's ``feature_strides``). Ordered as
    torchvision's RPN flattens predictions: level, then y, x, then anchor.
    """
    dummy = ImageList(torch.zeros(1, 3, image_size, image_size), [(image_size, image_size)])
    grids = [torch.zeros(1, 1, image_size // s, image_size // s) for s in strides]
    return detector.rpn.anchor_generator(dummy, grids)[0]
