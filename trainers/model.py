"""Turns a ModelSpec into an effdet config and model; the only place that knows effdet's config keys."""
from __future__ import annotations

import torch
from effdet import DetBenchPredict, DetBenchTrain, EfficientDet
from effdet.anchors import Anchors
from effdet.config import get_efficientdet_config
from effdet.config.fpn_config import get_fpn_config

from trainers import backbones
from trainers.anchors import BatchAnchorLabeler
from trainers.spec import ModelSpec

_FPN_NAMES = {"fastattn": "bifpn_fa", "attn": "bifpn_attn", "sum": "bifpn_sum"}


def effdet_config(spec: ModelSpec):
    """The effdet (OmegaConf) config for a spec, built on effdet's own defaults."""
    config = get_efficientdet_config("tf_efficientdet_d0")
    family_is_lite = spec.backbone_family == "efficientnet_lite"
    num_anchors_per_loc = config.num_scales * len(config.aspect_ratios)
    feat = spec.image_size // 2 ** spec.min_level
    num_anchors = sum((feat // 2 ** i) ** 2 for i in range(spec.num_levels)) * num_anchors_per_loc
    config.update(
        name=f"effsearch_{spec.backbone_family}",
        backbone_name=backbones.BACKBONE_NAME,
        # Merged into effdet's own backbone_args, not replacing them: replacing dropped its drop_path_rate.
        # timm's generators take bn_momentum here; norm_kwargs below reach only the BiFPN and heads.
        backbone_args=dict(config.backbone_args, family=spec.backbone_family, width=spec.backbone_width,
                           depth=spec.backbone_depth, drop_path_rate=spec.drop_path_rate,
                           bn_momentum=spec.bn_momentum),
        image_size=(spec.image_size, spec.image_size),
        num_classes=spec.num_classes,
        min_level=spec.min_level,
        max_level=spec.max_level,
        num_levels=spec.num_levels,
        anchor_scale=spec.anchor_scale,
        fpn_channels=spec.fpn_channels,
        fpn_cell_repeats=spec.fpn_repeats,
        box_class_repeats=spec.head_repeats,
        fpn_name=_FPN_NAMES[spec.fusion],
        # PyTorch-style padding: the backbone generator is timm's non-"tf_" EfficientNet.
        pad_type="",
        redundant_bias=False,
        act_type="relu6" if family_is_lite else "swish",
        norm_kwargs=dict(eps=1e-3, momentum=spec.bn_momentum),
        alpha=spec.focal_alpha,
        gamma=spec.focal_gamma,
        box_loss_weight=spec.box_loss_weight,
        # topk over anchors x classes must not ask for more points than exist at small inputs.
        max_detection_points=min(5000, num_anchors * spec.num_classes),
    )
    config.fpn_config = get_fpn_config(config.fpn_name, min_level=spec.min_level, max_level=spec.max_level)
    return config


def build_model(spec: ModelSpec) -> EfficientDet:
    """The raw EfficientDet network (per-level class and box outputs), randomly initialised, nothing downloaded."""
    return EfficientDet(effdet_config(spec), pretrained_backbone=False)


def train_bench(model: EfficientDet, *, labels_in_batch: bool = False) -> DetBenchTrain:
    """effdet's training wrapper: focal/box loss, and anchor labelling unless the batches carry the labels."""
    return DetBenchTrain(model, create_labeler=not labels_in_batch).to(_device_of(model))


def anchor_labeler(model: EfficientDet) -> BatchAnchorLabeler:
    """Labels batches in the data loader by the rules of the labeler DetBenchTrain would build."""
    return BatchAnchorLabeler(Anchors.from_config(model.config), model.config.num_classes, match_threshold=0.5)


def predict_bench(model: EfficientDet) -> DetBenchPredict:
    """effdet's prediction wrapper: decode + NMS, returning x1,y1,x2,y2,score,class rows.

    effdet builds the bench's anchor boxes on the CPU whatever the model's device; a CUDA model would then
    index CPU anchors with CUDA indices at its first evaluation. So the bench moves to the model's device.
    """
    return DetBenchPredict(model).to(_device_of(model))


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def build_on_meta(spec: ModelSpec) -> EfficientDet:
    """A weightless copy for counting FLOPs and parameters: no memory, no init cost worth speaking of."""
    with torch.device("meta"):
        return build_model(spec)
