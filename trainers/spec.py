"""ModelSpec: the typed, validated description of one EfficientDet variant that the rest of effsearch sees."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from trainers.typed import ConfigError, from_mapping

BACKBONE_FAMILIES = ("efficientnet", "efficientnet_lite")
FUSIONS = ("fastattn", "attn", "sum")
NECKS = ("bifpn", "pan", "fpn")
BOX_LOSSES = ("huber", "giou", "diou", "ciou")
ASSIGNERS = ("iou", "atss")
HEADS = ("anchor", "center")

# timm's standard sizes: name -> (backbone_family, width, depth), as timm's efficientnet_b*/efficientnet_lite*
# pass them to _gen_efficientnet / _gen_efficientnet_lite. A tf_ variant has the same tensors as its namesake.
STANDARD_BACKBONES: dict[str, tuple[str, float, float]] = {
    "efficientnet_b0": ("efficientnet", 1.0, 1.0),
    "efficientnet_b1": ("efficientnet", 1.0, 1.1),
    "efficientnet_b2": ("efficientnet", 1.1, 1.2),
    "efficientnet_b3": ("efficientnet", 1.2, 1.4),
    "efficientnet_b4": ("efficientnet", 1.4, 1.8),
    "efficientnet_b5": ("efficientnet", 1.6, 2.2),
    "efficientnet_b6": ("efficientnet", 1.8, 2.6),
    "efficientnet_b7": ("efficientnet", 2.0, 3.1),
    "efficientnet_lite0": ("efficientnet_lite", 1.0, 1.0),
    "efficientnet_lite1": ("efficientnet_lite", 1.0, 1.1),
    "efficientnet_lite2": ("efficientnet_lite", 1.1, 1.2),
    "efficientnet_lite3": ("efficientnet_lite", 1.2, 1.4),
    "efficientnet_lite4": ("efficientnet_lite", 1.4, 1.8),
}


class SpecError(ConfigError):
    """A ModelSpec field has a bad value; the message names the field."""


@dataclass(frozen=True)
class ModelSpec:
    """One EfficientDet variant. Every field is a plain number or string so it logs cleanly as MLflow params."""

    num_classes: int
    backbone_family: str = "efficientnet"
    backbone_width: float = 1.0
    backbone_depth: float = 1.0
    image_size: int = 512
    min_level: int = 3
    max_level: int = 7
    anchor_scale: float = 4.0
    fpn_channels: int = 64
    fpn_repeats: int = 3
    head_repeats: int = 3
    fusion: str = "fastattn"  # how each neck node weighs its inputs: effdet's fast normalised, softmax, or plain sum
    neck: str = "bifpn"  # bifpn: effdet's BiFPN; pan: effdet's PANet layout; fpn: top-down only (trainers/necks.py)
    head: str = "anchor"  # anchor: effdet's class and box nets; center: CenterNet-style, anchor-free (trainers/centernet.py)
    center_level: int = 3  # the neck level the center head predicts from (stride 2**center_level)
    # Anchor head only: which anchors learn which box, and the box regression loss.
    assigner: str = "iou"  # iou: effdet's fixed thresholds; atss: adaptive (trainers/atss.py)
    match_threshold: float = 0.5  # iou: an anchor with IoU >= this is positive (effdet's)
    unmatched_threshold: float = 0.5  # iou: below this negative; between the two, ignored
    atss_topk: int = 9  # atss: candidate anchor locations per level and box (the paper's k)
    box_loss: str = "huber"  # huber on effdet's encoded offsets, or an IoU loss on the decoded boxes
    # Loss settings live here because effdet keeps them in the model config.
    focal_alpha: float = 0.25
    focal_gamma: float = 1.5
    box_loss_weight: float = 50.0  # huber only: effdet's weight for its encoded-offset loss
    iou_loss_weight: float = 2.0  # giou, diou, ciou: ATSS's weight for GIoU against focal loss
    label_smoothing: float = 0.0  # class targets become t(1 - s) + s/2, as effdet's focal loss applies it
    # effdet's default (0.01, PyTorch convention) barely moves in a few hundred steps; see DESIGN.md.
    bn_momentum: float = 0.01
    # Stochastic depth in the backbone: effdet's D0 value (its Lite configs use 0.1).
    drop_path_rate: float = 0.2

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def num_levels(self) -> int:
        return self.max_level - self.min_level + 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "spec") -> "ModelSpec":
        """Build from an untrusted mapping; unknown keys, wrong types and bad values name the key."""
        return from_mapping(cls, data, where)

    def replace(self, **changes: Any) -> "ModelSpec":
        return dataclasses.replace(self, **changes)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise SpecError(message)


def _validate(s: ModelSpec) -> None:
    _check(s.num_classes >= 1, f"num_classes: must be >= 1, got {s.num_classes}")
    _check(s.backbone_family in BACKBONE_FAMILIES,
           f"backbone_family: must be one of {BACKBONE_FAMILIES}, got {s.backbone_family!r}")
    _check(0.1 <= s.backbone_width <= 4.0, f"backbone_width: must be in [0.1, 4], got {s.backbone_width}")
    _check(0.1 <= s.backbone_depth <= 6.0, f"backbone_depth: must be in [0.1, 6], got {s.backbone_depth}")
    # The backbone yields strides 8, 16, 32 (P3..P5); coarser levels are resampled from P5.
    _check(s.min_level == 3, f"min_level: must be 3 (the backbone's first feature level), got {s.min_level}")
    _check(3 <= s.max_level <= 8, f"max_level: must be in [3, 8], got {s.max_level}")
    stride = 2 ** s.max_level
    _check(s.image_size >= stride and s.image_size % stride == 0,
           f"image_size: must be a positive multiple of 2**max_level = {stride}, got {s.image_size}")
    _check(s.image_size <= 2048, f"image_size: must be <= 2048, got {s.image_size}")
    _check(s.anchor_scale > 0, f"anchor_scale: must be > 0, got {s.anchor_scale}")
    _check(8 <= s.fpn_channels <= 1024 and s.fpn_channels % 8 == 0,
           f"fpn_channels: must be a multiple of 8 in [8, 1024], got {s.fpn_channels}")
    _check(1 <= s.fpn_repeats <= 12, f"fpn_repeats: must be in [1, 12], got {s.fpn_repeats}")
    _check(1 <= s.head_repeats <= 8, f"head_repeats: must be in [1, 8], got {s.head_repeats}")
    _check(s.fusion in FUSIONS, f"fusion: must be one of {FUSIONS}, got {s.fusion!r}")
    _check(s.neck in NECKS, f"neck: must be one of {NECKS}, got {s.neck!r}")
    _check(s.head in HEADS, f"head: must be one of {HEADS}, got {s.head!r}")
    _check(s.min_level <= s.center_level <= s.max_level,
           f"center_level: must be a neck level in [{s.min_level}, {s.max_level}], got {s.center_level}")
    _check(s.assigner in ASSIGNERS, f"assigner: must be one of {ASSIGNERS}, got {s.assigner!r}")
    _check(0 < s.match_threshold <= 1, f"match_threshold: must be in (0, 1], got {s.match_threshold}")
    _check(0 < s.unmatched_threshold <= s.match_threshold,
           f"unmatched_threshold: must be in (0, match_threshold = {s.match_threshold}], got {s.unmatched_threshold}")
    _check(1 <= s.atss_topk <= 64, f"atss_topk: must be in [1, 64], got {s.atss_topk}")
    _check(s.box_loss in BOX_LOSSES, f"box_loss: must be one of {BOX_LOSSES}, got {s.box_loss!r}")
    _check(s.iou_loss_weight > 0, f"iou_loss_weight: must be > 0, got {s.iou_loss_weight}")
    _check(0 <= s.label_smoothing < 0.5, f"label_smoothing: must be in [0, 0.5), got {s.label_smoothing}")
    _check(0 < s.focal_alpha < 1, f"focal_alpha: must be in (0, 1), got {s.focal_alpha}")
    _check(s.focal_gamma >= 0, f"focal_gamma: must be >= 0, got {s.focal_gamma}")
    _check(s.box_loss_weight > 0, f"box_loss_weight: must be > 0, got {s.box_loss_weight}")
    _check(0 < s.bn_momentum <= 1, f"bn_momentum: must be in (0, 1], got {s.bn_momentum}")
    _check(0 <= s.drop_path_rate < 1, f"drop_path_rate: must be in [0, 1), got {s.drop_path_rate}")
