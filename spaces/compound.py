"""The `compound` space: the EfficientDet paper's scaling rules with their coefficients searched, not fixed.

The paper scales every part with one phi and hand-set constants: backbone depth alpha^phi, width beta^phi and
resolution gamma^phi with alpha * beta^2 * gamma^2 ~ 2 (1.2, 1.1, 1.15); BiFPN width 64 * 1.35^phi, BiFPN
depth 3 + phi, head depth 3 + floor(phi / 3). Here phi and the coefficients are all searched around those
values, within bounds the job file sets (a GPU-sized default, and a CPU-sized variant that differs only in
its bounds and base).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import optuna

from spaces.bounds import HeldSpecFields, check_ranges, check_step, parse_bounds
from trainers.spec import ModelSpec, SpecError
from trainers.typed import ConfigError

# alpha * beta^2 * gamma^2: the compound-scaling constraint (FLOPs about double per unit of phi).
FLOPS_GROWTH = 2.0


@dataclass(frozen=True)
class CompoundBounds(HeldSpecFields):
    """The compound space's base model and search bounds; (low, high) pairs are inclusive."""

    backbone_family: str = "efficientnet"
    base_width: float = 1.0
    base_depth: float = 1.0
    base_resolution: int = 512
    phi: tuple[float, float] = (0.0, 3.0)
    phi_step: float = 0.5
    alpha: tuple[float, float] = (1.05, 1.35)  # depth; the paper's 1.2
    beta: tuple[float, float] = (1.0, 1.2)  # width; the paper's 1.1
    fpn_width_base: tuple[int, int] = (48, 96)  # BiFPN channels at phi = 0; the paper's 64
    fpn_width_growth: tuple[float, float] = (1.2, 1.5)  # per unit of phi; the paper's 1.35
    fpn_depth_base: tuple[int, int] = (2, 4)  # BiFPN cells at phi = 0; the paper's 3
    fpn_depth_slope: tuple[float, float] = (0.5, 1.5)  # cells per unit of phi; the paper's 1
    head_depth_base: tuple[int, int] = (2, 4)  # box/class head repeats at phi = 0; the paper's 3

    def __post_init__(self) -> None:
        check_ranges(self, ("phi", "alpha", "beta", "fpn_width_base", "fpn_width_growth", "fpn_depth_base",
                            "fpn_depth_slope", "head_depth_base"))
        if self.phi[0] < 0:
            raise ConfigError(f"phi: must be >= 0, got {self.phi[0]}")
        # Stepped ranges must end on a step, or Optuna silently moves their upper ends.
        check_step("phi", *self.phi, self.phi_step)
        check_step("fpn_width_base", *self.fpn_width_base, 8)
        check_step("fpn_depth_slope", *self.fpn_depth_slope, 0.25)
        if self.alpha[0] < 1 or self.beta[0] < 1:
            raise ConfigError(f"{'alpha' if self.alpha[0] < 1 else 'beta'}: must be >= 1 (scaling up never shrinks)")
        # gamma is derived from alpha and beta; it must stay >= 1, or a larger phi would shrink the input.
        if self.alpha[1] * self.beta[1] ** 2 > FLOPS_GROWTH:
            raise ConfigError(f"alpha, beta: alpha * beta^2 reaches {self.alpha[1] * self.beta[1] ** 2:.3f} at their "
                              f"upper bounds, above {FLOPS_GROWTH:g}, which would leave gamma below 1")
        if self.fpn_width_base[0] < 8 or self.fpn_depth_base[0] < 1 or self.head_depth_base[0] < 1:
            raise ConfigError("fpn_width_base, fpn_depth_base, head_depth_base: must be at least 8, 1 and 1")
        check_extremes(self)


# The bounds that move each spec field the compound space sets: a refused field names these keys.
FIELD_KEYS = {"backbone_width": "phi, beta, base_width", "backbone_depth": "phi, alpha, base_depth",
              "image_size": "phi, alpha, beta, base_resolution, max_level",
              "fpn_channels": "phi, fpn_width_base, fpn_width_growth",
              "fpn_repeats": "phi, fpn_depth_base, fpn_depth_slope", "head_repeats": "phi, head_depth_base"}


def check_extremes(bounds: CompoundBounds) -> None:
    """What the model accepts (ModelSpec's limits: backbone_width <= 4, image_size <= 2048, fpn_repeats <= 12...)
    is checked when the job is read, naming the bounds, and not at a proposal after Ray has started.

    Every spec field grows or shrinks monotonically with each parameter (phi >= 0 and alpha, beta, gamma >= 1),
    so four corners of the box hold every field's extremes: all lows, all highs, and the input's two ends, where
    gamma (which falls as alpha and beta rise) is at its largest with the largest phi and its smallest with the
    smallest phi.
    """
    names = ("phi", "alpha", "beta", "fpn_width_base", "fpn_width_growth", "fpn_depth_base", "fpn_depth_slope",
             "head_depth_base")
    low = {name: getattr(bounds, name)[0] for name in names}
    high = {name: getattr(bounds, name)[1] for name in names}
    corners = (low, high, {**high, "alpha": low["alpha"], "beta": low["beta"]},
               {**low, "alpha": high["alpha"], "beta": high["beta"]})
    for corner in corners:
        spec = compound(optuna.trial.FixedTrial(corner), bounds=bounds)["spec"]
        try:
            ModelSpec(num_classes=1, **spec)
        except SpecError as err:
            field = str(err).split(":", 1)[0]
            at = ", ".join(f"{name} {corner[name]:g}" for name in names)
            raise ConfigError(f"{FIELD_KEYS.get(field, field)}: the space reaches a model that is refused, at "
                              f"{at}: {err}") from None


# The paper's constants (phi aside), as parameters of this space.
PAPER_RULE = {"alpha": 1.2, "beta": 1.1, "fpn_width_base": 64, "fpn_width_growth": 1.35, "fpn_depth_base": 3,
              "fpn_depth_slope": 1.0, "head_depth_base": 3}


def rule_params(phi: float, bounds: CompoundBounds) -> dict[str, float]:
    """The paper's rule at `phi` as this space's parameters, each constant clamped into the job's bounds.

    Clamping keeps the rule a point of the space: the CPU preset's BiFPN (base 24-48 channels, 1-2 cells) cannot
    hold the paper's 64 channels and 3 cells, so its rule is the nearest point, 48 channels and 2 cells.
    """
    low, high = bounds.phi
    steps = (phi - low) / bounds.phi_step
    if not low - 1e-9 <= phi <= high + 1e-9 or abs(steps - round(steps)) > 1e-9:
        raise ConfigError(f"rule:{phi:g}: phi must be one of the space's values ({low:g} to {high:g} in steps of "
                          f"{bounds.phi_step:g})")
    params: dict[str, float] = {"phi": phi}
    for name, value in PAPER_RULE.items():
        lo, hi = getattr(bounds, name)
        params[name] = min(max(value, lo), hi)
    params["fpn_width_base"] = 8 * round(params["fpn_width_base"] / 8)
    return params


def gamma_of(alpha: float, beta: float) -> float:
    """The resolution coefficient that makes alpha * beta^2 * gamma^2 exactly FLOPS_GROWTH.

    Derived rather than searched and rejected: one coefficient fewer to search, and no proposal is wasted on a
    combination that breaks the constraint.
    """
    return math.sqrt(FLOPS_GROWTH / (alpha * beta ** 2))


def compound(trial: optuna.Trial, backbone: tuple[str, float, float] | None = None,
             bounds: CompoundBounds | None = None) -> dict[str, Any]:
    """phi, the backbone's alpha and beta (gamma derived), and the BiFPN's and heads' scaling rules.

    With a pretrained `backbone` (family, width, depth) the backbone stays at that size; phi then scales
    resolution, BiFPN and heads, and alpha and beta are not searched.
    """
    b = bounds or CompoundBounds()
    phi = trial.suggest_float("phi", b.phi[0], b.phi[1], step=b.phi_step)
    if backbone is None:
        alpha = trial.suggest_float("alpha", *b.alpha)
        beta = trial.suggest_float("beta", *b.beta)
        family, width, depth = b.backbone_family, round(b.base_width * beta ** phi, 3), round(b.base_depth * alpha ** phi, 3)
        gamma = gamma_of(alpha, beta)
    else:
        family, width, depth = backbone
        gamma = gamma_of(1.2, 1.1)  # the paper's resolution coefficient
    stride = 2 ** b.max_level
    image_size = max(stride, stride * round(b.base_resolution * gamma ** phi / stride))
    width_base = trial.suggest_int("fpn_width_base", *b.fpn_width_base, step=8)
    growth = trial.suggest_float("fpn_width_growth", *b.fpn_width_growth)
    depth_base = trial.suggest_int("fpn_depth_base", *b.fpn_depth_base)
    slope = trial.suggest_float("fpn_depth_slope", *b.fpn_depth_slope, step=0.25)
    head_base = trial.suggest_int("head_depth_base", *b.head_depth_base)
    spec = {
        "backbone_family": family,
        "backbone_width": width,
        "backbone_depth": depth,
        "image_size": image_size,
        "fpn_channels": max(8, 8 * round(width_base * growth ** phi / 8)),
        "fpn_repeats": max(1, round(depth_base + slope * phi)),
        "head_repeats": head_base + math.floor(phi / 3),  # the paper's head rule, from a searched base
        "min_level": 3,
        "max_level": b.max_level,
        "anchor_scale": b.anchor_at(image_size, b.base_resolution),
        "fusion": "fastattn",
        "bn_momentum": b.bn_momentum,
        "drop_path_rate": b.drop_path_rate,
    }
    return {"spec": spec}


# The CPU-sized variant (what the lite_cpu space is for): EfficientDet-Lite at half width and depth, 160 px,
# up to P5, and a BiFPN narrow enough to train in minutes on 2 cores.
CPU_BOUNDS = CompoundBounds(
    backbone_family="efficientnet_lite", base_width=0.5, base_depth=0.5, base_resolution=160, phi=(0.0, 1.0),
    phi_step=0.25, fpn_width_base=(24, 48), fpn_depth_base=(1, 2), fpn_depth_slope=(0.5, 1.5),
    head_depth_base=(2, 2), max_level=5, anchor_scale=1.875, scale_anchors=True, bn_momentum=0.1, drop_path_rate=0.1)


BOUNDS_PRESETS = {"gpu": CompoundBounds(), "cpu": CPU_BOUNDS}


def compound_bounds(raw: Any, where: str = "job.search.bounds") -> CompoundBounds:
    """A job file's bounds: `preset` (gpu, the default, or cpu) with any of its fields overridden."""
    return parse_bounds(BOUNDS_PRESETS, raw, where)
