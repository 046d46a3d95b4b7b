"""EfficientDet D0..D7x (the paper's Table 1) as rows of data that go through the one ModelSpec builder."""
from __future__ import annotations

from trainers.spec import STANDARD_BACKBONES, ModelSpec

# EfficientNet B0..B7 compound-scaling multipliers (width, depth), as timm builds them.
BACKBONE_SCALING = {name.removeprefix("efficientnet_"): (width, depth)
                    for name, (family, width, depth) in STANDARD_BACKBONES.items() if family == "efficientnet"}

# name: backbone, input resolution, BiFPN channels, BiFPN cells, head repeats, max level, anchor scale.
# D7 uses anchor scale 5 and D7x adds level P8, as in the official release; D6+ fuse with a plain sum,
# as the official models do for training stability.
_TABLE = {
    "d0": ("b0", 512, 64, 3, 3, 7, 4.0, "fastattn"),
    "d1": ("b1", 640, 88, 4, 3, 7, 4.0, "fastattn"),
    "d2": ("b2", 768, 112, 5, 3, 7, 4.0, "fastattn"),
    "d3": ("b3", 896, 160, 6, 4, 7, 4.0, "fastattn"),
    "d4": ("b4", 1024, 224, 7, 4, 7, 4.0, "fastattn"),
    "d5": ("b5", 1280, 288, 7, 4, 7, 4.0, "fastattn"),
    "d6": ("b6", 1280, 384, 8, 5, 7, 4.0, "sum"),
    "d7": ("b6", 1536, 384, 8, 5, 7, 5.0, "sum"),
    "d7x": ("b7", 1536, 384, 8, 5, 8, 4.0, "sum"),
}

PRESETS = tuple(_TABLE)


def preset(name: str, num_classes: int = 90) -> ModelSpec:
    """The ModelSpec of a paper preset; 90 classes is COCO's label space, as the paper counts."""
    key = name.lower()
    if key not in _TABLE:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    backbone, resolution, fpn_channels, fpn_repeats, head_repeats, max_level, anchor_scale, fusion = _TABLE[key]
    width, depth = BACKBONE_SCALING[backbone]
    return ModelSpec(
        num_classes=num_classes, backbone_family="efficientnet", backbone_width=width, backbone_depth=depth,
        image_size=resolution, max_level=max_level, anchor_scale=anchor_scale, fpn_channels=fpn_channels,
        fpn_repeats=fpn_repeats, head_repeats=head_repeats, fusion=fusion,
    )
