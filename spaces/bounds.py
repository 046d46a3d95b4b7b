"""A space's bounds from the job file: a named preset with any of its fields overridden, each field validated."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, TypeVar

from trainers.typed import ConfigError, from_mapping

B = TypeVar("B")


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
