"""COVID-CT-Mask-Net: detector -> ranked RoIs [B, N, 5] -> classifier head -> logits [B, 3].

The head is the preset's ``head`` (:mod:`ctmask.training.heads`): the paper's S or the pooled head.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN

from ctmask.core.errors import CheckpointError, ConfigError
from ctmask.core.presets import Preset
from ctmask.training.detector import build_detector
from ctmask.training.heads import HEADS, build_head
from ctmask.training.ranked_rois import RankedRoIs

VARIANTS: tuple[str, ...] = ("heads", "heads+bn", "full")
"""Classifier training variants (paper Table 1): S only; S + BatchNorm affine; everything."""


class CovidCTMaskNet(nn.Module):
    """Detector (always in inference mode) + ranked RoI module + classifier head (``preset.head``).

    ``forward(images [B, 1, S, S] in [0, 1]) -> (rois [B, N, 5], logits [B, 3])``; with
    ``with_boxes=True`` also the rows' decoded boxes [B, N, 4], and with ``with_labels=True`` (the
    exported graph) their lesion class ids [B, N].
    """

    def __init__(self, preset: Preset, detector: MaskRCNN | None = None):
        super().__init__()
        self.preset = preset
        self.detector = detector if detector is not None else build_detector(preset)
        self.ranker = RankedRoIs(self.detector, preset)
        self.classifier = build_head(preset.head, preset.n_rois, preset.classifier_width, preset.num_slice_classes)

    def train(self, mode: bool = True) -> CovidCTMaskNet:
        # The detector computes no losses and keeps its BN statistics frozen while S trains.
        super().train(mode)
        self.detector.eval()
        return self

    def forward(self, images: Tensor, with_boxes: bool = False, with_labels: bool = False) -> tuple[Tensor, ...]:
        if not with_boxes:
            rois = self.ranker(images)
            return rois, self.classifier(rois)
        if with_labels:
            rois, boxes, labels = self.ranker(images, with_boxes=True, with_labels=True)
            return rois, self.classifier(rois), boxes, labels
        rois, boxes = self.ranker(images, with_boxes=True)
        return rois, self.classifier(rois), boxes

    def state_dict_for_checkpoint(self) -> dict[str, Tensor]:
        """Detector + S weights under ``detector.*`` / ``classifier.*`` (no duplicates)."""
        sd = {f"detector.{k}": v for k, v in self.detector.state_dict().items()}
        sd.update({f"classifier.{k}": v for k, v in self.classifier.state_dict().items()})
        return sd


def count(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (BN running statistics excluded)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def batchnorm_layers(module: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer in ``module``."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def bn_affine_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Weight and bias of every BatchNorm layer in ``module``."""
    return [p for m in batchnorm_layers(module) for p in m.parameters()]


def set_variant(model: CovidCTMaskNet, variant: str) -> list[nn.Parameter]:
    """Set ``requires_grad`` for a classifier training variant; return the trained parameters.

    Raises:
        ConfigError: ``variant`` is not one of :data:`VARIANTS`.
    """
    if variant not in VARIANTS:
        raise ConfigError(f"unknown classifier variant {variant!r}; expected one of {list(VARIANTS)}")
    model.detector.requires_grad_(variant == "full")
    if variant == "heads+bn":
        for p in bn_affine_parameters(model.detector):
            p.requires_grad_(True)
    model.classifier.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def parameter_report(preset: Preset) -> dict:
    """Parameter counts per part and trainable counts per classifier variant.

    Counts are of ``nn.Parameter`` elements (weights, biases, BatchNorm affine); the ``*_with_bn_statistics``
    figures add every BatchNorm buffer (running mean, running variance, ``num_batches_tracked``), i.e.
    every element of the state dict. ``segmentation_model`` is the Mask R-CNN (what a segmentation
    checkpoint holds); ``classifier_model`` is what the reference's classification checkpoint holds:
    the detector without its mask branch (the reference builds the classifier as a Faster R-CNN) plus
    the head. ``total`` is ctmask's classifier model, which keeps the (unused) mask branch.
    """
    model = CovidCTMaskNet(preset)
    d = model.detector
    parts = {
        "backbone_body": count(d.backbone.body),
        "fpn": count(d.backbone.fpn),
        "rpn_head": count(d.rpn.head),
        "box_head": count(d.roi_heads.box_head),
        "box_predictor": count(d.roi_heads.box_predictor),
        "mask_branch": count(d.roi_heads.mask_head) + count(d.roi_heads.mask_predictor),
        "classifier_s": count(model.classifier),
    }
    bn_stats = sum(b.numel() for m in batchnorm_layers(d) for b in m.buffers())
    classifier_model = count(d) - parts["mask_branch"] + parts["classifier_s"]
    report = {
        "preset": preset.name,
        "parts": parts,
        "mask_rcnn_total": count(d),
        "mask_rcnn_total_with_bn_statistics": count(d) + bn_stats,
        "segmentation_model": count(d),
        "segmentation_model_with_bn_statistics": count(d) + bn_stats,
        "classifier_model": classifier_model,
        "classifier_model_with_bn_statistics": classifier_model + bn_stats,
        "bn_statistics": bn_stats,
        "classifier_s": parts["classifier_s"],
        "total": count(model),
        "head": preset.head,
        # Every head on this preset's N and F, the paper's S among them (the ``head`` above
        # is the one ``classifier_s`` and ``total`` count).
        "heads": {name: {"parameters": count(build_head(name, preset.n_rois, preset.classifier_width,
                                                         preset.num_slice_classes)), "what": what}
                  for name, what in HEADS.items()},
        "trainable_by_variant": {},
    }
    for v in VARIANTS:
        set_variant(model, v)
        report["trainable_by_variant"][v] = count(model, trainable_only=True)
    return report


def load_state(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """``module.load_state_dict(state)`` with a :class:`CheckpointError` naming ``path``."""
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][:4]
        raise CheckpointError("weights do not fit the model: " + " | ".join(lines)[:600], path) from None


def load_weights(model: CovidCTMaskNet, state: dict[str, Tensor], path: Path) -> None:
    """Load :meth:`CovidCTMaskNet.state_dict_for_checkpoint` output (strict).

    Raises:
        CheckpointError: naming ``path``, when keys or shapes do not fit the model.
    """
    det = {k[len("detector.") :]: v for k, v in state.items() if k.startswith("detector.")}
    cls = {k[len("classifier.") :]: v for k, v in state.items() if k.startswith("classifier.")}
    load_state(model.detector, det, path)
    load_state(model.classifier, cls, path)


@torch.no_grad()
def predict(model: CovidCTMaskNet, images: Tensor) -> tuple[Tensor, Tensor]:
    """Eval-mode forward: rois [B, N, 5], class probabilities [B, 3] (softmax of logits)."""
    model.eval()
    rois, logits = model(images)
    return rois, torch.softmax(logits, -1)
