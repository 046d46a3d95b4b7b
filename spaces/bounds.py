"""A space's bounds from the job file: a named preset with any of its fields overridden, each field validated."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from trainers.typed import ConfigError, from_mapping

B = TypeVar("B")


@dataclass(frozen=True)
class HeldSpecFields:
    """What a model space holds fixed from its bounds rather than searching: the coarsest feature level, the
    anchors, BatchNorm's momentum and stochastic depth."""

    max_level: int = 7
    # The paper keeps anchor_scale at 4 for 512 px and up; below about 384 px that leaves most small objects
    # matching no anchor (DESIGN.md), so the CPU presets scale it with the input.
    anchor_scale: float = 4.0
    scale_anchors: bool = False
    bn_momentum: float = 0.01
    drop_path_rate: float = 0.2

    def anchor_at(self, image_size: int, reference: int) -> float:
        """anchor_scale, or with scale_anchors anchor_scale * image_size / reference."""
        return round(self.anchor_scale * (image_size / reference if self.scale_anchors else 1.0), 3)


def parse_bounds(presets: dict[str, B], raw: Any, where: str) -> B:
    """`raw` is {preset: NAME, FIELD: VALUE, ...}; the first preset is the default, and a space with a single
    preset takes no `preset` key. Every message names the key under `where`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    overrides = dict(raw)
    default = next(iter(presets))
    name = overrides.pop("preset", default)
    if len(presets) == 1 and "preset" in raw:
        raise ConfigError(f"{where}.preset: this space has no presets; set its bounds directly")
    if not isinstance(name, str) or name not in presets:
        raise ConfigError(f"{where}.preset: must be one of {', '.join(presets)}, got {name!r}")
    base = presets[name]
    fields = asdict(base)
    unknown = sorted(set(map(str, overrides)) - set(fields))
    if unknown:
        expected = (["preset"] if len(presets) > 1 else []) + list(fields)
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (expected one of: {', '.join(expected)})")
    return from_mapping(type(base), {**fields, **overrides}, where)


def check_ranges(bounds: Any, names: tuple[str, ...]) -> None:
    """Each named (low, high) field has low <= high; the message names the field."""
    for name in names:
        low, high = getattr(bounds, name)
        if low > high:
            raise ConfigError(f"{name}: low {low} is above high {high}")


def check_step(name: str, low: float, high: float, step: float) -> None:
    """A stepped range must end on a step, or Optuna silently moves its upper end."""
    if step <= 0:
        raise ConfigError(f"{name}: the step must be > 0, got {step}")
    steps = (high - low) / step
    if abs(steps - round(steps)) > 1e-9:
        raise ConfigError(f"{name}: {high:g} - {low:g} is not a whole number of steps of {step:g}")
