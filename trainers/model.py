"""Turns a ModelSpec into an effdet config and model, and the benches and labeler its head trains with."""
from __future__ import annotations

import torch
from effdet import DetBenchPredict, EfficientDet
from effdet.anchors import Anchors
from effdet.config import get_efficientdet_config

from trainers import backbones
from trainers.anchors import BatchAnchorLabeler
from trainers.centernet import CenterLabeler, CenterNet, CenterPredictBench, CenterTrainBench
from trainers.losses import AnchorTrainBench
from trainers.necks import neck_config
from trainers.spec import ModelSpec

_FUSION_SUFFIX = {"fastattn": "fa", "attn": "attn", "sum": "sum"}  # as effdet names its fpn configs


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
        fpn_name=f"{spec.neck}_{_FUSION_SUFFIX[spec.fusion]}",  # a label only: fpn_config below is what builds
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
    config.fpn_config = neck_config(spec.neck, spec.fusion, spec.min_level, spec.max_level)
    return config


def build_model(spec: ModelSpec) -> EfficientDet:
    """The raw network, randomly initialised, nothing downloaded: effdet's EfficientDet (per-level class and
    box outputs) for the anchor head, CenterNet (a heatmap and box regression at one level) for the center head."""
    if spec.head == "center":
        return CenterNet(effdet_config(spec), spec.center_level)
    return EfficientDet(effdet_config(spec), pretrained_backbone=False)


def train_bench(model: EfficientDet, spec: ModelSpec) -> torch.nn.Module:
    """The training wrapper of the spec's head, for batches that carry the labels of `labeler`: forward(images,
    targets) returns {"loss", "class_loss", "box_loss"}."""
    bench = CenterTrainBench(model) if spec.head == "center" else AnchorTrainBench(model, spec)
    return bench.to(_device_of(model))


def labeler(spec: ModelSpec, model: EfficientDet):
    """Labels whole batches in the data loader for the spec's head and assigner (trainers/anchors.py,
    trainers/centernet.py): called with boxes, classes and optional per-box weights."""
    if spec.head == "center":
        return CenterLabeler(model.config, spec.center_level)
    return BatchAnchorLabeler(Anchors.from_config(model.config), spec.num_classes,
                              match_threshold=spec.match_threshold, unmatched_threshold=spec.unmatched_threshold,
                              assigner=spec.assigner, atss_topk=spec.atss_topk)


def predict_bench(model: EfficientDet, spec: ModelSpec) -> torch.nn.Module:
    """The prediction wrapper of the spec's head: forward(images, {"img_scale", "img_size"}) returns
    x1,y1,x2,y2,score,class rows in original pixels. For the anchor head that is effdet's (decode + NMS).

    effdet builds the bench's anchor boxes on the CPU whatever the model's device; a CUDA model would then
    index CPU anchors with CUDA indices at its first evaluation. So the bench moves to the model's device.
    """
    bench = CenterPredictBench(model) if spec.head == "center" else DetBenchPredict(model)
    return bench.to(_device_of(model))


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def build_on_meta(spec: ModelSpec) -> EfficientDet:
    """A weightless copy for counting FLOPs and parameters: no memory, no init cost worth speaking of."""
    with torch.device("meta"):
        return build_model(spec)
