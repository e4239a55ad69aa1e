"""Model presets: every size and threshold of a model, frozen in one dataclass.

``paper`` reproduces COVID-CT-Mask-Net exactly (see shared/REFERENCE.md); ``small`` keeps
the architecture but shrinks backbone, widths, input and N so it trains in minutes on two
CPU cores, and classifies with the pooled head instead of the paper's S. A preset's name is
stored in every checkpoint and exported graph, and loading checks it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ctmask.core.errors import ConfigError

CLASS_NAMES: tuple[str, ...] = ("normal", "pneumonia", "covid19")
"""Slice classes of S, in logit order: 0 normal (control), 1 common pneumonia, 2 COVID-19."""

LESION_NAMES: tuple[str, ...] = ("background", "ggo", "consolidation")
"""Detector classes: 0 background, 1 ground-glass opacity, 2 consolidation."""

HEAD_NAMES: tuple[str, ...] = ("paper", "pooled")
"""Classifier heads (``ctmask.training.heads``): ``paper`` is S of the paper, ``pooled`` the
permutation-invariant head whose calls survive input noise and reduced precision."""

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
        backbone_blocks: residual blocks per ResNet stage (layer1..layer4).
        bottleneck: True for ResNet Bottleneck blocks (ResNet50), False for BasicBlock.
        fpn_channels: FPN output channels (also RPN / RoI head input channels).
        image_size: square model input side in pixels (multiple of 32).
        mask_head_channels: channels of the four mask-head convolutions.
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

    def __post_init__(self) -> None:
        check_head(self.head)

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

PRESETS: dict[str, Preset] = {p.name: p for p in (PAPER, SMALL)}


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
