"""The `training` space: learning rate, weight decay, warmup, batch size and the focal loss's gamma and alpha.

It searches how a model trains, not which model: it composes with one model space (`[bifpn, training]`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from spaces.bounds import check_ranges, check_step, parse_bounds
from trainers.typed import ConfigError


@dataclass(frozen=True)
class TrainingBounds:
    """(low, high) pairs are inclusive. The defaults are centred on the recipe's own (trainers/recipe.py) and
    effdet's focal loss (gamma 1.5, alpha 0.25)."""

    lr: tuple[float, float] = (1e-3, 3e-2)  # log-uniform; for train.lr_batch images, scaled with the batch
    weight_decay: tuple[float, float] = (1e-5, 1e-3)  # log-uniform
    warmup_epochs: tuple[float, float] = (0.0, 2.0)
    warmup_step: float = 0.25
    batch_size: tuple[int, ...] = (8, 16, 32)  # per worker; the choices
    focal_gamma: tuple[float, float] = (1.0, 2.5)
    focal_alpha: tuple[float, float] = (0.15, 0.4)

    def __post_init__(self) -> None:
        check_ranges(self, ("lr", "weight_decay", "warmup_epochs", "focal_gamma", "focal_alpha"))
        for name in ("lr", "weight_decay"):
            if getattr(self, name)[0] <= 0:
                raise ConfigError(f"{name}: must be > 0 (searched on a log scale), got {getattr(self, name)[0]}")
        if self.warmup_epochs[0] < 0:
            raise ConfigError(f"warmup_epochs: must be >= 0, got {self.warmup_epochs[0]}")
        check_step("warmup_epochs", *self.warmup_epochs, self.warmup_step)
        if not self.batch_size or min(self.batch_size) < 1 or len(set(self.batch_size)) < len(self.batch_size):
            raise ConfigError(f"batch_size: must be distinct integers >= 1, got {list(self.batch_size)}")
        if self.focal_gamma[0] < 0:
            raise ConfigError(f"focal_gamma: must be >= 0, got {self.focal_gamma[0]}")
        if not (0 < self.focal_alpha[0] and self.focal_alpha[1] < 1):
            raise ConfigError(f"focal_alpha: must lie in (0, 1), got {list(self.focal_alpha)}")


TRAINING_PRESETS = {"default": TrainingBounds()}


def training_bounds(raw: Any, where: str = "job.search.bounds") -> TrainingBounds:
    return parse_bounds(TRAINING_PRESETS, raw, where)


def training(trial: optuna.Trial, bounds: TrainingBounds = TrainingBounds()) -> dict[str, Any]:
    """{"train": TrainConfig overrides, "spec": the focal loss's settings}: effdet keeps its loss settings in
    the model config, so they travel with the model spec (they change no FLOPs)."""
    b = bounds
    train = {
        "lr": trial.suggest_float("lr", *b.lr, log=True),
        "weight_decay": trial.suggest_float("weight_decay", *b.weight_decay, log=True),
        "warmup_epochs": trial.suggest_float("warmup_epochs", *b.warmup_epochs, step=b.warmup_step),
        "batch_size": trial.suggest_categorical("batch_size", list(b.batch_size)),
    }
    spec = {
        "focal_gamma": trial.suggest_float("focal_gamma", *b.focal_gamma),
        "focal_alpha": trial.suggest_float("focal_alpha", *b.focal_alpha),
    }
    return {"train": train, "spec": spec}
