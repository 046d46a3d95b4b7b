"""The trial schedulers a job can choose: fifo, asha (Ray's, on AP), and pareto, a successive-halving stopper
that ranks each rung by non-dominated sorting on (AP, GFLOPs), as MOASHA does (Schmucker et al., 2021).

The Pareto stopper is written here because neither library has one: Ray Tune's schedulers rank on a single
metric, and Optuna's pruners refuse multi-objective studies. On AP alone the cheap configurations, which learn
slower, are stopped first and the frontier loses its low-FLOPs end; ranked by front and then crowding
distance, each rung keeps its cheapest and its most accurate trials first.

Asynchronous, like ASHA: a trial reaching a rung is compared with every trial that reached it before, and
continues if it is in the best 1/eta of them; the first to arrive always continues.
"""
from __future__ import annotations

import math
import pickle
from typing import Sequence

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from search.pareto import AP_GFLOPS, pareto_keys

TIME_ATTR = "epoch"


def rung_milestones(grace_period: int, reduction_factor: float, max_epochs: int) -> list[int]:
    """Epochs at which trials are ranked: grace, grace*eta, ... while below max_epochs (the last is not a rung)."""
    milestones, epoch = [], grace_period
    while epoch < max_epochs:
        milestones.append(epoch)
        epoch = math.ceil(epoch * reduction_factor)
    return milestones


class ParetoSuccessiveHalving(FIFOScheduler):
    """Stops a trial at a rung unless it ranks in the best ceil(n / eta) of the n trials recorded there, ranked by
    non-dominated front on `metrics` and then by crowding distance (larger first). Only results that carry every metric count:
    a rung waits for the trial's next scored epoch when the rung's epoch was not evaluated."""

    def __init__(self, *, max_epochs: int, grace_period: int = 2, reduction_factor: float = 3,
                 metrics: Sequence[str] = ("map", "gflops"), modes: Sequence[str] = AP_GFLOPS):
        super().__init__()
        if grace_period < 1 or reduction_factor <= 1:
            raise ValueError("grace_period must be >= 1 and reduction_factor > 1")
        self.milestones = rung_milestones(grace_period, reduction_factor, max_epochs)
        self.reduction_factor = reduction_factor
        self.metrics, self.modes = tuple(metrics), tuple(modes)
        self.rungs: dict[int, dict[str, tuple[float, ...]]] = {m: {} for m in self.milestones}
        self.stopped: list[str] = []

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if TIME_ATTR not in result or any(result.get(m) is None for m in self.metrics):
            return TrialScheduler.CONTINUE
        point = tuple(float(result[m]) for m in self.metrics)
        for milestone in self.milestones:
            rung = self.rungs[milestone]
            if result[TIME_ATTR] < milestone or trial.trial_id in rung:
                continue
            rung[trial.trial_id] = point
            if not self._survives(rung, trial.trial_id):
                self.stopped.append(trial.trial_id)
                return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def _survives(self, rung: dict[str, tuple[float, ...]], trial_id: str) -> bool:
        """In the best ceil(n / eta) by (front, crowding distance), ties with the last kept included: each front's
        extremes (infinitely crowded) tie, so on a small rung both the cheapest and the most accurate continue."""
        ids = list(rung)
        points = [rung[i] for i in ids]
        keys = pareto_keys(points, self.modes)
        kept = max(1, math.ceil(len(ids) / self.reduction_factor))
        cutoff = sorted(keys)[kept - 1]
        return keys[ids.index(trial_id)] <= cutoff

    def debug_string(self) -> str:
        sizes = ", ".join(f"epoch {m}: {len(r)}" for m, r in self.rungs.items())
        return f"ParetoSuccessiveHalving: {len(self.stopped)} stopped; trials per rung: {sizes}"

    def save(self, checkpoint_path: str):
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__dict__, file)

    def restore(self, checkpoint_path: str):
        with open(checkpoint_path, "rb") as file:
            self.__dict__.update(pickle.load(file))


def make_scheduler(name: str, *, max_epochs: int, grace_period: int, reduction_factor: float) -> TrialScheduler:
    """The job's scheduler; `asha` is Ray's ASHA on AP alone, kept for comparison."""
    if name == "pareto":
        return ParetoSuccessiveHalving(max_epochs=max_epochs, grace_period=grace_period,
                                       reduction_factor=reduction_factor)
    if name == "asha":
        # stop_last_trials=False: the trial ends by itself at its last epoch, with its full-budget report.
        return ASHAScheduler(time_attr=TIME_ATTR, metric="map", mode="max", max_t=max_epochs,
                             grace_period=min(grace_period, max_epochs), reduction_factor=reduction_factor,
                             stop_last_trials=False)
    return FIFOScheduler()
