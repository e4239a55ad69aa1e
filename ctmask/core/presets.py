"""Model presets: every size and threshold of a model, frozen in one dataclass.

``paper`` reproduces COVID-CT-Mask-Net exactly (see shared/REFERENCE.md); ``small`` keeps
the architecture but shrinks backbone, widths, input and N so it trains in minutes on two
CPU cores, and classifies with the pooled head instead of the paper's S. A preset's name is
stored in every checkpoint and exported graph, and loading checks it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ctmask.core.errors import ConfigError

CLASS_NAMES: tuple[str, ...] = ("normal", "pneumonia", "covid19")
"""Slice classes of S, in logit order: 0 normal (control), 1 common pneumonia, 2 COVID-19."""

LESION_NAMES: tuple[str, ...] = ("background", "ggo", "consolidation")
"""Detector classes of mask type ``both``: 0 background, 1 ground-glass opacity, 2 consolidation."""

MASK_TYPES: dict[str, tuple[str, ...]] = {
    "both": LESION_NAMES,
    "ggo": ("background", "ggo"),
    "merge": ("background", "lesion"),
}
"""The reference's ``mask_type`` -> detector classes: ``both`` GGO and consolidation (3 classes),
``ggo`` GGO only, ``merge`` GGO and consolidation merged into one lesion class (2 classes)."""

RESNET_STAGES = 4
"""ResNet stages layer1..layer4, output strides 4, 8, 16, 32."""

HEAD_NAMES: tuple[str, ...] = ("paper", "pooled")
"""Classifier heads (``ctmask.training.heads``): ``paper`` is S of the paper, ``pooled`` the
permutation-invariant head whose calls survive input noise and reduced precision."""

SUPPRESSIONS: dict[str, str] = {
    "nms": "hard NMS per lesion class at cls_nms_thresh (the paper's): a box above the IoU threshold with a "
           "higher-scored one is dropped",
    "matrix": "Gaussian matrix NMS per lesion class (SOLOv2): each score decays by exp(-(IoU^2 - c^2) / sigma) "
              "against every higher-scored box of its class (c: that box's own largest overlap above it), "
              "so a score moves continuously with the boxes' overlaps and scores",
}
"""Suppression rules of the ranked RoIs S reads (``Preset.roi_suppression``, ``train-cls --suppression``)."""


def check_suppression(name: str) -> str:
    """``name`` if it is a key of :data:`SUPPRESSIONS`.

    Raises:
        ConfigError: an unknown rule.
    """
    if name not in SUPPRESSIONS:
        raise ConfigError(f"unknown RoI suppression {name!r}; expected one of {list(SUPPRESSIONS)}")
    return name


def check_head(name: str) -> str:
    """Return ``name`` if it is one of :data:`HEAD_NAMES`, else raise :class:`ConfigError` naming them."""
    if name not in HEAD_NAMES:
        raise ConfigError(f"unknown classifier head {name!r}; expected one of {list(HEAD_NAMES)}")
    return name


IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preset:
    """All architecture and post-processing settings of one model size.

    Attributes:
        name: preset name, stored in checkpoints and graphs.
        backbone_blocks: residual blocks per ResNet stage (layer1..layer4); the stages
            a truncation drops are not built, whatever their count says.
        bottleneck: True for ResNet Bottleneck blocks (ResNet50), False for BasicBlock.
        fpn_channels: FPN output channels (also RPN / RoI head input channels).
        image_size: square model input side in pixels (multiple of 32).
        mask_head_channels: channels of the mask-head convolutions.
        n_rois: N, rows of the ranked RoI tensor fed to S.
        classifier_width: F, hidden width of S.
        rpn_min_size: RPN proposals with a side (after clipping) below this are dropped
            before RPN NMS, by torchvision's RPN (``rpn.min_size``, training and eager
            inference) and by :class:`~ctmask.training.ranked_rois.RankedRoIs` alike.
            0.0 keeps every proposal, as the reference implementation does: the base
            anchors of size 2 at ratios 0.1 and 0.25 round to zero height, and their
            proposals take post-NMS slots until the heads drop boxes under 1e-2.
            The default 1e-3 is torchvision's (and what checkpoints written before this
            field existed were trained and measured with).
        truncation: ResNet stages dropped from the end (the reference's ``truncation``):
            0 keeps layer1..layer4, 1 ends at layer3, 2 at layer2.
        fpn_levels: how many of the last kept stages feed the FPN, one level each, no
            extra max-pool level: 4 for the paper's ResNet50 (layer1..layer4), 1 for the
            reference's ResNet18 / 34, whose FPN reads the last kept stage alone.
        mask_head_layers: 3x3 convolutions of the mask head (4 in the paper's model, 1 in
            the reference's lightweight models).
        mask_type: a key of :data:`MASK_TYPES`; fixes ``num_lesion_classes`` (3 for
            ``both``, 2 for ``ggo`` / ``merge``) and how training merges or drops the
            consolidation masks.
        roi_suppression: how the ranked RoIs S reads suppress overlapping candidates (a key of
            :data:`SUPPRESSIONS`): ``nms``, the paper's hard per-class NMS at
            ``cls_nms_thresh``, or ``matrix``, a continuous Gaussian decay of each score by its
            overlap with higher-scored boxes of its class. Lesion detections (segmentation,
            ``detections``) keep hard NMS either way.
        roi_suppression_sigma: the ``matrix`` decay's sigma (smaller suppresses harder).
    """

    name: str
    backbone_blocks: tuple[int, int, int, int]
    bottleneck: bool
    fpn_channels: int
    image_size: int
    mask_head_channels: int
    n_rois: int
    classifier_width: int
    anchor_sizes: tuple[int, ...] = (2, 4, 8, 16, 32)
    aspect_ratios: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0)
    rpn_nms_thresh: float = 0.75
    rpn_min_size: float = 1e-3
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    box_representation: int = 128
    box_coder_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    seg_score_thresh: float = 0.05
    seg_nms_thresh: float = 0.5
    seg_detections: int = 100
    cls_score_thresh: float = -0.01
    cls_nms_thresh: float = 0.75
    num_lesion_classes: int = 3
    num_slice_classes: int = 3
    head: str = "paper"
    truncation: int = 0
    fpn_levels: int = RESNET_STAGES
    mask_head_layers: int = 4
    mask_type: str = "both"
    roi_suppression: str = "nms"
    roi_suppression_sigma: float = 0.5

    def __post_init__(self) -> None:
        check_head(self.head)
        check_suppression(self.roi_suppression)
        if not (math.isfinite(self.roi_suppression_sigma) and 0.01 <= self.roi_suppression_sigma <= 10.0):
            raise ConfigError(f"roi_suppression_sigma {self.roi_suppression_sigma!r}: expected 0.01 to 10")
        if self.mask_type not in MASK_TYPES:
            raise ConfigError(f"unknown mask type {self.mask_type!r}; expected one of {list(MASK_TYPES)}")
        if self.num_lesion_classes != len(MASK_TYPES[self.mask_type]):
            raise ConfigError(f"mask type {self.mask_type!r} has {len(MASK_TYPES[self.mask_type])} detector "
                              f"classes, the preset says num_lesion_classes={self.num_lesion_classes}")
        if not 0 <= self.truncation < RESNET_STAGES:
            raise ConfigError(f"truncation {self.truncation}: expected 0 to {RESNET_STAGES - 1}")
        if not 1 <= self.fpn_levels <= self.kept_stages:
            raise ConfigError(f"fpn_levels {self.fpn_levels}: expected 1 to {self.kept_stages} "
                              f"(the stages truncation {self.truncation} keeps)")
        if self.mask_head_layers < 1:
            raise ConfigError(f"mask_head_layers {self.mask_head_layers}: expected at least 1")

    @property
    def kept_stages(self) -> int:
        """ResNet stages built (4 - truncation)."""
        return RESNET_STAGES - self.truncation

    @property
    def fpn_stages(self) -> tuple[int, ...]:
        """0-based indices of the ResNet stages feeding the FPN (0 = layer1)."""
        return tuple(range(self.kept_stages - self.fpn_levels, self.kept_stages))

    @property
    def feature_strides(self) -> tuple[int, ...]:
        """Output stride of each FPN level, in level order (4 * 2**stage)."""
        return tuple(4 * 2**i for i in self.fpn_stages)

    @property
    def lesion_names(self) -> tuple[str, ...]:
        """Detector class names of :attr:`mask_type`, background first."""
        return MASK_TYPES[self.mask_type]

    @property
    def anchors_per_location(self) -> int:
        return len(self.anchor_sizes) * len(self.aspect_ratios)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PAPER = Preset(
    name="paper",
    backbone_blocks=(3, 4, 6, 3),
    bottleneck=True,
    fpn_channels=256,
    image_size=512,
    mask_head_channels=256,
    n_rois=256,
    classifier_width=1024,
    rpn_min_size=0.0,  # the reference keeps zero-area proposals (see Preset)
)

SMALL = Preset(
    name="small",
    backbone_blocks=(1, 1, 1, 1),
    bottleneck=False,
    fpn_channels=64,
    image_size=192,
    mask_head_channels=64,
    n_rois=64,
    classifier_width=256,
    rpn_pre_nms_top_n_train=600,
    rpn_post_nms_top_n_train=300,
    rpn_pre_nms_top_n_test=300,
    rpn_post_nms_top_n_test=300,
    box_batch_size_per_image=128,
    # Measured on the `make accuracy` detector (docs/model.md, "Stable head"): more accurate than the
    # paper's S, and its calls hold under input noise, FP16 and INT8.
    head="pooled",
)

PAPER_MERGE = dataclasses.replace(PAPER, name="paper-merge", mask_type="merge", num_lesion_classes=2)
"""The paper's model trained on merged masks (the authors' ``segmentation_model_merged_masks.pth`` /
``classification_model_merged_masks.pth``: one lesion class, ``--mask_type merge``)."""


def _lightweight(name: str, blocks: tuple[int, int, int, int]) -> Preset:
    """The reference's lightweight model on a ResNet18 / 34 (BasicBlock) body, as its README's example
    trains and evaluates it (every value from the reference implementation, AlexTS1980/COVID-CT-Mask-Net):

    - truncation 1 (``--truncation 1``: the body ends at layer3) and a one-level FPN on layer3
      (``backbone_utils.resnet_fpn_backbone``: ``return_layers = {'layer3': 0}``, in channels
      ``backbone.out_channels`` = 256, out channels 256, no extra pool level);
    - mask head: one 3x3 convolution of 128 channels, predictor 128 -> 128 -> classes
      (``train_segmentation.py``: ``MaskRCNNHeads(in_channels=256, layers=(128,))``,
      ``MaskRCNNPredictor(in_channels=128, dim_reduced=128)`` for resnet18 / 34);
    - mask type ``merge`` (``--mask_type merge``; ``pretrained_models/Models.md``: the lightweight
      models predict one lesion class), so ``--num_class 2``;
    - N 128 (``--roi_batch_size 128``) and S width 512 (``--s_features 512``), the README's
      ``train_classifier.py`` / ``evaluate_classifier.py`` example;
    - 512 x 512 input (``min_size 512``), box head 256 * 7 * 7 -> 128 -> 128, anchors, RPN and RoI
      thresholds as the full model (the same scripts build both), so as the ``paper`` preset.
    """
    return dataclasses.replace(PAPER, name=name, backbone_blocks=blocks, bottleneck=False, truncation=1,
                               fpn_levels=1, mask_head_channels=128, mask_head_layers=1, n_rois=128,
                               classifier_width=512, mask_type="merge", num_lesion_classes=2)


RESNET18_T1 = _lightweight("resnet18-t1", (2, 2, 2, 2))
"""The reference's lightweight ResNet18 model (authors: 6.35M weights, 93.95% accuracy)."""
RESNET34_T1 = _lightweight("resnet34-t1", (3, 4, 6, 3))
"""The reference's lightweight ResNet34 model (authors: 11.74M weights, 92.89% accuracy)."""

PRESETS: dict[str, Preset] = {p.name: p for p in (PAPER, SMALL, PAPER_MERGE, RESNET18_T1, RESNET34_T1)}


def get_preset(name: str) -> Preset:
    """Return the preset called ``name``; raise :class:`ConfigError` naming the choices."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown preset {name!r}; expected one of {sorted(PRESETS)}"
        ) from None


def preset_from_dict(d: dict) -> Preset:
    """Rebuild a preset from :meth:`Preset.to_dict` output (lists become tuples)."""
    fields = {f.name for f in dataclasses.fields(Preset)}
    unknown = set(d) - fields
    if unknown:
        raise ConfigError(f"preset has unknown fields {sorted(unknown)}")
    return Preset(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
