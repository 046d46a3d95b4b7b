"""The `bifpn` space: the BiFPN's channels and cells, the heads' depth, the fusion and the input resolution,
searched directly over one backbone that the job file chooses."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from spaces.bounds import HeldSpecFields, check_ranges, check_step, parse_bounds
from trainers.spec import BACKBONE_FAMILIES, FUSIONS, ModelSpec, SpecError
from trainers.typed import ConfigError


# The input size at which scaled anchors keep anchor_scale as it is: the paper's D0.
ANCHOR_REFERENCE = 512


@dataclass(frozen=True)
class BifpnBounds(HeldSpecFields):
    """The backbone held fixed, and the searched ranges; (low, high) pairs are inclusive."""

    backbone_family: str = "efficientnet"
    backbone_width: float = 1.0  # EfficientNet-B0's multipliers
    backbone_depth: float = 1.0
    fpn_channels: tuple[int, int] = (48, 160)  # multiples of 8; D0..D3 use 64..160
    fpn_repeats: tuple[int, int] = (2, 6)  # BiFPN cells
    head_repeats: tuple[int, int] = (2, 4)
    fusions: tuple[str, ...] = ("fastattn", "sum")
    image_size: tuple[int, int] = (384, 896)
    image_step: int = 128  # a multiple of 2**max_level, so every input divides into the coarsest level

    def __post_init__(self) -> None:
        check_ranges(self, ("fpn_channels", "fpn_repeats", "head_repeats", "image_size"))
        if self.backbone_family not in BACKBONE_FAMILIES:
            raise ConfigError(f"backbone_family: must be one of {', '.join(BACKBONE_FAMILIES)}, "
                              f"got {self.backbone_family!r}")
        if not (0.1 <= self.backbone_width <= 4 and 0.1 <= self.backbone_depth <= 6):
            raise ConfigError("backbone_width, backbone_depth: must lie in [0.1, 4] and [0.1, 6]")
        if self.fpn_channels[0] < 8 or any(c % 8 for c in self.fpn_channels):
            raise ConfigError(f"fpn_channels: must be multiples of 8, at least 8, got {list(self.fpn_channels)}")
        if self.fpn_repeats[0] < 1 or self.head_repeats[0] < 1:
            raise ConfigError(f"{'fpn_repeats' if self.fpn_repeats[0] < 1 else 'head_repeats'}: must be >= 1")
        unknown = [f for f in self.fusions if f not in FUSIONS]
        if not self.fusions or unknown or len(set(self.fusions)) < len(self.fusions):
            raise ConfigError(f"fusions: must be distinct values among {', '.join(FUSIONS)}, got {list(self.fusions)}")
        if not 3 <= self.max_level <= 8:
            raise ConfigError(f"max_level: must be in [3, 8], got {self.max_level}")
        stride = 2 ** self.max_level
        if self.image_step % stride or self.image_size[0] % stride or self.image_size[0] < stride:
            raise ConfigError(f"image_size, image_step: must be multiples of 2**max_level = {stride}, got "
                              f"{list(self.image_size)} in steps of {self.image_step}")
        check_step("image_size", *self.image_size, self.image_step)
        check_step("fpn_channels", *self.fpn_channels, 8)
        if self.anchor_scale <= 0:
            raise ConfigError(f"anchor_scale: must be > 0, got {self.anchor_scale}")
        # What the model accepts (ModelSpec's limits: image_size <= 2048, fpn_repeats <= 12, ...) is checked
        # here, naming the bound, and not at the first proposal after Ray has started: every spec the space
        # proposes lies between these two corners.
        for corner in (0, 1):
            image_size = self.image_size[corner]
            try:
                ModelSpec(num_classes=1, backbone_family=self.backbone_family, backbone_width=self.backbone_width,
                          backbone_depth=self.backbone_depth, image_size=image_size, max_level=self.max_level,
                          anchor_scale=self.anchor_at(image_size, ANCHOR_REFERENCE),
                          fpn_channels=self.fpn_channels[corner], fpn_repeats=self.fpn_repeats[corner],
                          head_repeats=self.head_repeats[corner], fusion=self.fusions[0],
                          bn_momentum=self.bn_momentum, drop_path_rate=self.drop_path_rate)
            except SpecError as err:
                raise ConfigError(str(err)) from None


# The CPU-sized variant: EfficientNet-Lite at half width and depth, 128-224 px, levels P3-P5 (at these inputs P6
# and P7 are 1-2 px maps whose BatchNorm statistics are noise), anchors scaled with the input (6 * R / 512).
CPU_BIFPN = BifpnBounds(
    backbone_family="efficientnet_lite", backbone_width=0.5, backbone_depth=0.5, fpn_channels=(24, 64),
    fpn_repeats=(1, 3), head_repeats=(1, 3), image_size=(128, 224), image_step=32, max_level=5, anchor_scale=6.0,
    scale_anchors=True, bn_momentum=0.1, drop_path_rate=0.1)

BIFPN_PRESETS = {"gpu": BifpnBounds(), "cpu": CPU_BIFPN}


def bifpn_bounds(raw: Any, where: str = "job.search.bounds") -> BifpnBounds:
    """A job file's bounds for this space: `preset` (gpu, the default, or cpu) with any field overridden."""
    return parse_bounds(BIFPN_PRESETS, raw, where)


def bifpn(trial: optuna.Trial, backbone: tuple[str, float, float] | None = None,
          bounds: BifpnBounds = BifpnBounds()) -> dict[str, Any]:
    """With a pretrained `backbone` (family, width, depth), that backbone replaces the bounds' one."""
    b = bounds
    family, width, depth = backbone or (b.backbone_family, b.backbone_width, b.backbone_depth)
    image_size = trial.suggest_int("image_size", *b.image_size, step=b.image_step)
    spec = {
        "backbone_family": family,
        "backbone_width": width,
        "backbone_depth": depth,
        "image_size": image_size,
        "fpn_channels": trial.suggest_int("fpn_channels", *b.fpn_channels, step=8),
        "fpn_repeats": trial.suggest_int("fpn_repeats", *b.fpn_repeats),
        "head_repeats": trial.suggest_int("head_repeats", *b.head_repeats),
        "min_level": 3,
        "max_level": b.max_level,
        "anchor_scale": b.anchor_at(image_size, ANCHOR_REFERENCE),
        "fusion": trial.suggest_categorical("fusion", list(b.fusions)),
        "bn_momentum": b.bn_momentum,
        "drop_path_rate": b.drop_path_rate,
    }
    return {"spec": spec}


def preset_params(row: dict[str, Any], bounds: BifpnBounds) -> dict[str, Any]:
    """A paper preset's BiFPN, heads, fusion and resolution as this space's parameters, each clamped into the
    bounds and onto their step (a fusion the bounds leave out becomes their first)."""
    b = bounds

    def on_grid(value: float, low: int, high: int, step: int) -> int:
        return low + step * round((min(max(value, low), high) - low) / step)

    return {
        "image_size": on_grid(row["image_size"], *b.image_size, b.image_step),
        "fpn_channels": on_grid(row["fpn_channels"], *b.fpn_channels, 8),
        "fpn_repeats": min(max(row["fpn_repeats"], b.fpn_repeats[0]), b.fpn_repeats[1]),
        "head_repeats": min(max(row["head_repeats"], b.head_repeats[0]), b.head_repeats[1]),
        "fusion": row["fusion"] if row["fusion"] in b.fusions else b.fusions[0],
    }
