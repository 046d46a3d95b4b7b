"""The `detector` space: neck family, head, box loss, sample assignment, label smoothing and mixup.

It searches which detector parts a model is built and trained with, beside one model space that sizes it
(`[compound, detector]`). The neck and head change FLOPs; the assigner, box loss, label smoothing and mixup
change only training. The box loss and assigner are the anchor head's, so they are proposed only with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from spaces.bounds import check_ranges, parse_bounds
from trainers.spec import ASSIGNERS, BOX_LOSSES, HEADS, NECKS, ModelSpec
from trainers.typed import ConfigError


@dataclass(frozen=True)
class DetectorBounds:
    """The choices to search (each a non-empty list of distinct values) and two inclusive (low, high) ranges."""

    necks: tuple[str, ...] = NECKS
    heads: tuple[str, ...] = HEADS
    box_losses: tuple[str, ...] = ("huber", "giou", "ciou")
    assigners: tuple[str, ...] = ASSIGNERS
    label_smoothing: tuple[float, float] = (0.0, 0.1)
    mixup_prob: tuple[float, float] = (0.0, 0.5)

    def __post_init__(self) -> None:
        for name, allowed in (("necks", NECKS), ("heads", HEADS), ("box_losses", BOX_LOSSES),
                              ("assigners", ASSIGNERS)):
            values = getattr(self, name)
            if not values or len(set(values)) < len(values) or any(v not in allowed for v in values):
                raise ConfigError(f"{name}: must be distinct values among {', '.join(allowed)}, got {list(values)}")
        check_ranges(self, ("label_smoothing", "mixup_prob"))
        if not (0 <= self.label_smoothing[0] and self.label_smoothing[1] < 0.5):
            raise ConfigError(f"label_smoothing: must lie in [0, 0.5), got {list(self.label_smoothing)}")
        if not (0 <= self.mixup_prob[0] and self.mixup_prob[1] <= 1):
            raise ConfigError(f"mixup_prob: must lie in [0, 1], got {list(self.mixup_prob)}")


DETECTOR_PRESETS = {"default": DetectorBounds()}


def detector_bounds(raw: Any, where: str = "job.search.bounds") -> DetectorBounds:
    return parse_bounds(DETECTOR_PRESETS, raw, where)


def _choose(trial: optuna.Trial, name: str, choices: tuple):
    # A single choice is held, not searched: Optuna would record a parameter with nothing to learn.
    return choices[0] if len(choices) == 1 else trial.suggest_categorical(name, list(choices))


def _range(trial: optuna.Trial, name: str, bounds: tuple[float, float]) -> float:
    low, high = bounds
    return low if low == high else trial.suggest_float(name, low, high)


def detector(trial: optuna.Trial, bounds: DetectorBounds = DetectorBounds()) -> dict[str, Any]:
    """{"spec": the detector parts, "train": mixup}."""
    b = bounds
    head = _choose(trial, "head", b.heads)
    spec = {"neck": _choose(trial, "neck", b.necks), "head": head,
            "label_smoothing": _range(trial, "label_smoothing", b.label_smoothing)}
    if head == "anchor":
        spec["box_loss"] = _choose(trial, "box_loss", b.box_losses)
        spec["assigner"] = _choose(trial, "assigner", b.assigners)
    return {"spec": spec, "train": {"mixup_prob": _range(trial, "mixup_prob", b.mixup_prob)}}


def choice_costs(spec: ModelSpec) -> list[dict[str, Any]]:
    """Params and GFLOPs of `spec` with each neck, each head, and each assigner and box loss swapped in.

    Assigners and box losses change only training, so their rows cost what the spec does; they are listed so
    that a user sees that, not left to guess.
    """
    from trainers.cost import model_cost

    rows = []
    for field, values in (("neck", NECKS), ("head", HEADS), ("assigner", ASSIGNERS), ("box_loss", BOX_LOSSES)):
        for value in values:
            changed = spec.replace(**{field: value})
            cost = model_cost(changed)
            rows.append({"field": field, "value": value, "params": cost.params, "params_m": round(cost.params_m, 3),
                         "gflops": round(cost.gflops, 3), "current": getattr(spec, field) == value})
    return rows
