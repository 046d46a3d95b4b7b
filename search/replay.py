"""Recorded learning curves (benchmarks/record_curves.py) and a trial trainable that serves them instantly, so the
real search machinery (Tune, the searcher, the scheduler, MLflow) runs on real curves in seconds.

A proposal is served the recorded configuration nearest to it: the smallest sum of squared log-ratios over the
model spec's sizes (resolution, backbone width and depth, BiFPN width and cells, head repeats). The trial then
reports that configuration's own GFLOPs and AP at each epoch, so each result is one that was measured.

Seconds are charged per epoch from benchmarks/curve_timings.csv (benchmarks/time_curves.py): every configuration
timed again under one set of conditions, in rounds of shuffled order, and the median taken. The recording's own
seconds are kept but not charged: it shared its 2 cores with other work for stretches (up to 4x slower epochs), so
the same network was recorded at 267 s and at 399 s for six epochs, and the configurations recorded on a quiet
stretch looked cheap. Without a timings file the fastest recorded epoch is charged, as before 2026-12-06.
"""
from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

# The spec sizes a proposal is matched on.
MATCHED = ("image_size", "backbone_width", "backbone_depth", "fpn_channels", "fpn_repeats", "head_repeats")
CURVES_CSV = Path(__file__).resolve().parents[1] / "benchmarks" / "curves.csv"
TIMINGS_CSV = CURVES_CSV.with_name("curve_timings.csv")
# One row per configuration and epoch.
COLUMNS = ("config", *MATCHED, "gflops", "params_m", "epoch", "map", "epoch_s", "eval_s")
# One row per configuration and timing round.
TIMING_COLUMNS = ("config", "round", "epoch_s", "eval_s", "first_epoch_s")


@dataclass(frozen=True)
class Curve:
    """One recorded configuration: its spec sizes, its cost, and per epoch (AP, training seconds, eval seconds)."""

    config: str
    sizes: tuple[float, ...]
    gflops: float
    params_m: float
    epochs: tuple[tuple[float, float, float], ...]
    timed_s: tuple[float, float] | None = None  # the re-timed (training, evaluation) seconds of one epoch

    @property
    def recorded_charge_s(self) -> tuple[float, float]:
        """The fastest recorded training epoch and evaluation."""
        return min(e for _, e, _ in self.epochs), min(v for _, _, v in self.epochs)

    @property
    def charged_s(self) -> tuple[float, float]:
        """Seconds charged per epoch (training, evaluation): the re-timed figures where there are some."""
        return self.timed_s or self.recorded_charge_s

    def distance(self, spec: dict) -> float:
        return sum(math.log(float(spec[key]) / size) ** 2 for key, size in zip(MATCHED, self.sizes))


def load_curves(path: str | Path = CURVES_CSV) -> list[Curve]:
    """The recorded curves, each with its re-timed seconds from curve_timings.csv beside `path` when that file
    exists. A timings file that leaves out a configuration is an error: charging it by the other measure would
    skew the comparison."""
    timings = Path(path).with_name(TIMINGS_CSV.name)
    timed = load_timings(timings) if timings.exists() else None
    rows: dict[str, list[dict]] = {}
    with open(path, newline="") as file:
        for row in csv.DictReader(file):
            rows.setdefault(row["config"], []).append(row)
    curves = []
    for config, epochs in rows.items():
        epochs.sort(key=lambda r: int(r["epoch"]))
        first = epochs[0]
        if timed is not None and config not in timed:
            raise ValueError(f"{timings}: no timing of {config}, which {path} records")
        curves.append(Curve(config, tuple(float(first[k]) for k in MATCHED), float(first["gflops"]),
                            float(first["params_m"]),
                            tuple((float(r["map"]), float(r["epoch_s"]), float(r["eval_s"])) for r in epochs),
                            (timed or {}).get(config)))
    return curves


def load_timings(path: str | Path) -> dict[str, tuple[float, float]]:
    """Per configuration, the median over timing rounds of one epoch's training and evaluation seconds."""
    runs: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="") as file:
        for row in csv.DictReader(file):
            runs.setdefault(row["config"], []).append((float(row["epoch_s"]), float(row["eval_s"])))
    return {config: (statistics.median(e for e, _ in r), statistics.median(v for _, v in r))
            for config, r in runs.items()}


def write_curves(path: str | Path, rows: list[dict]) -> None:
    _write_rows(path, COLUMNS, rows)


def write_timings(path: str | Path, rows: list[dict]) -> None:
    _write_rows(path, TIMING_COLUMNS, rows)


def _write_rows(path: str | Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


class ReplayTrainable:
    """A search's trainable (run_search(trainable=...)): each trial reports, epoch by epoch and at once, the
    recorded curve nearest to its proposed spec, with `replayed` naming that configuration, and the curve's
    charged seconds as `epoch_s` and `eval_s`."""

    def __init__(self, curves: list[Curve]):
        if not curves:
            raise ValueError("no recorded curves to replay")
        self.curves = curves

    def nearest(self, spec: dict) -> Curve:
        return min(self.curves, key=lambda curve: curve.distance(spec))

    def __call__(self, config: dict, *, setup) -> None:
        from ray import tune

        curve = self.nearest(config["spec"])
        epochs = setup.job.train.epochs
        if epochs > len(curve.epochs):
            raise ValueError(f"train.epochs {epochs}: the recorded curves hold {len(curve.epochs)} epochs")
        epoch_s, eval_s = curve.charged_s
        for epoch in range(1, epochs + 1):
            ap = curve.epochs[epoch - 1][0]
            last = epoch == epochs
            tune.report({"epoch": epoch, "map": ap, "gflops": curve.gflops, "params_m": curve.params_m,
                         "epoch_s": epoch_s, "eval_s": eval_s, "replayed": curve.config,
                         **({"full_budget": 1} if last else {})})
