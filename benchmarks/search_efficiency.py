"""Hypervolume against compute for four ways to search the CPU compound space, on the replay table
(benchmarks/curves.csv), each a real search (Tune, the searcher, the scheduler, MLflow) over 5 seeds.

Methods, each with the job file's other defaults:
- default: multivariate TPE with the Pareto successive-halving stopper (the job defaults);
- random_fifo: random sampling, every trial to the end;
- tpe_asha: multivariate TPE with Ray's ASHA on AP alone;
- grid: the paper's rule at every phi step of the space (rule:0 ... rule:1), every trial to the end.

Estimator, fixed before any result was seen:
- Compute is charged per trial as the training plus evaluation seconds of every epoch it ran, summed in the order
  trials end. A method's hypervolume at compute c is that of the complete trials ended by then. The seconds per
  epoch are each configuration's re-timed median (benchmarks/curve_timings.csv, see search/replay.py). Until
  2026-12-06 they were its fastest recorded epoch; that charge measured the recording machine's load more than
  the configuration (the same network at 267 s and 399 s), and it was replaced before any search was run on
  the new one.
- Hypervolume of (AP, GFLOPs) with reference point (AP 0, GFLOPs 1.1 x the costliest recorded configuration).
- Every method is compared at equal compute: the budget is BUDGET_X times the grid's total compute.
- Headline `compute_to_grid_hv`: per seed, the default's compute when its hypervolume first reaches the grid's
  final hypervolume, over the grid's total compute; the median over seeds (inf when a seed never reached it).
- Also printed: the share of compute points (20 evenly spaced up to the budget) at which the default's median
  hypervolume is at or above random's, and, at the budget, the default's and tpe_asha's cheapest frontier point
  and hypervolume (medians over seeds).
"""
from __future__ import annotations

import itertools
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray import tune  # noqa: E402

from search.pareto import hypervolume, pareto_front  # noqa: E402
from search.replay import ReplayTrainable, load_curves  # noqa: E402

SEEDS = 5
EPOCHS = 6
BUDGET_X = 3.0
# Trials per search, sized from the table so that each method can spend the whole budget: a fifo trial costs a
# full curve, a successive-halving one often a third of it.
TRIAL_SLACK = {"default": 2.6, "random_fifo": 1.3, "tpe_asha": 2.6}
SETTINGS = {"default": {}, "random_fifo": {"sampler": "random", "scheduler": "fifo"},
            "tpe_asha": {"sampler": "tpe", "scheduler": "asha"}}
RULE = [f"rule:{phi}" for phi in (0, 0.25, 0.5, 0.75, 1)]
POINTS = 20
ORACLE_SET_SIZE = 4
OUT = Path(__file__).resolve().parent / "search_efficiency.png"


class ComputeLedger(tune.Callback):
    """Per trial, in the order trials end: (compute charged, AP, GFLOPs, complete)."""

    def __init__(self):
        self.charged: dict[str, float] = {}
        self.ended: list[tuple[float, float, float, bool]] = []

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.charged[trial.trial_id] = self.charged.get(trial.trial_id, 0.0) + result["epoch_s"] + result["eval_s"]

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        self.ended.append((self.charged.get(trial.trial_id, 0.0), last.get("map", 0.0), last.get("gflops", 0.0),
                           last.get("full_budget") == 1))


def run_one(name: str, seed: int, search: dict, trials: int, shapes: dict, work: Path, replay) -> list:
    from search.job import parse_job
    from search.run import run_search

    raw = {"name": f"{name}-{seed}", "data": {**shapes, "check": "headers"},
           "search": {"space": "compound", "bounds": {"preset": "cpu"}, "trials": trials, "seed": seed, **search},
           "train": {"epochs": EPOCHS}}
    ledger = ComputeLedger()
    folder = work / f"{name}-{seed}"
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    folder.mkdir(parents=True)
    run_search(parse_job(raw), store=folder / "store", say=lambda _: None, trainable=replay, callbacks=[ledger])
    return ledger.ended


def curve(ended: list, reference: tuple[float, float], at: list[float]) -> list[float]:
    """Hypervolume of the complete trials ended by each compute point in `at`."""
    spent, points, steps = 0.0, [], []
    for charged, ap, gflops, complete in ended:
        spent += charged
        if complete:
            points.append((ap, gflops))
        steps.append((spent, hypervolume(points, reference)))
    return [max([hv for c, hv in steps if c <= x], default=0.0) for x in at]


def first_reaching(ended: list, reference, target: float) -> float:
    spent, points = 0.0, []
    for charged, ap, gflops, complete in ended:
        spent += charged
        if complete:
            points.append((ap, gflops))
            if hypervolume(points, reference) >= target - 1e-12:
                return spent
    return math.inf


def front_at(ended: list, budget: float) -> list[tuple[float, float]]:
    spent, points = 0.0, []
    for charged, ap, gflops, complete in ended:
        spent += charged
        if spent > budget:
            break
        if complete:
            points.append((ap, gflops))
    return [points[i] for i in pareto_front(points)]


def main() -> None:
    import ray

    from trainers.shapes import make_shapes

    start = time.time()
    curves = load_curves()
    replay = ReplayTrainable(curves)
    reference = (0.0, 1.1 * max(c.gflops for c in curves))
    work = Path(tempfile.mkdtemp(prefix="search-efficiency-"))
    # The replay ignores the images, but a search still loads and checks a dataset: the smallest that trains.
    made = make_shapes(work / "shapes", train_images=16, val_images=4)
    shapes = {split: {"annotations": str(p["annotations"]), "images": str(p["images"])} for split, p in made.items()}
    try:
        grid = run_one("grid", 0, {"enqueue": RULE, "scheduler": "fifo", "sampler": "random"}, len(RULE), shapes,
                       work, replay)
        grid_compute = sum(charged for charged, *_ in grid)
        grid_hv = hypervolume([(ap, g) for _, ap, g, ok in grid if ok], reference)
        budget = BUDGET_X * grid_compute
        mean_full = EPOCHS * sum(sum(c.charged_s) for c in curves) / len(curves)
        trials = {name: math.ceil(slack * budget / mean_full) for name, slack in TRIAL_SLACK.items()}
        print(f"grid: {len(grid)} trials, compute {grid_compute:.0f} s, hypervolume {grid_hv:.5f}; "
              f"budget per method {budget:.0f} s; reference point (AP 0, {reference[1]:.4f} GFLOPs)", flush=True)
        runs = {name: [] for name in SETTINGS}
        for seed in range(SEEDS):
            for name, search in SETTINGS.items():
                ended = run_one(name, seed, search, trials[name], shapes, work, replay)
                runs[name].append(ended)
                spent = sum(c for c, *_ in ended)
                print(f"{name} seed {seed}: {len(ended)} trials, {sum(ok for *_, ok in ended)} complete, "
                      f"compute {spent:.0f} s ({spent / budget:.2f} of the budget), "
                      f"hypervolume at the budget {curve(ended, reference, [budget])[0]:.5f} "
                      f"[{time.time() - start:.0f} s]", flush=True)
    finally:
        ray.shutdown()

    at = [budget * (k + 1) / POINTS for k in range(POINTS)]
    medians = {name: [statistics.median(curve(e, reference, at)[k] for e in runs[name]) for k in range(POINTS)]
               for name in runs}
    print("\n| compute (x grid) | " + " | ".join(runs) + " | grid |")
    print("|---|" + "---|" * (len(runs) + 1))
    for k, x in enumerate(at):
        grid_now = curve(grid, reference, [x])[0]
        print(f"| {x / grid_compute:.2f} | " + " | ".join(f"{medians[n][k]:.5f}" for n in runs) + f" | {grid_now:.5f} |")
    at_or_above = sum(d >= r - 1e-12 for d, r in zip(medians["default"], medians["random_fifo"])) / POINTS
    print(f"\ndefault at or above random_fifo at {at_or_above:.0%} of the {POINTS} compute points")
    for name in ("default", "tpe_asha"):
        fronts = [front_at(e, budget) for e in runs[name]]
        cheapest = statistics.median(min(g for _, g in f) if f else math.inf for f in fronts)
        hv = statistics.median(hypervolume(f, reference) for f in fronts)
        print(f"{name} at the budget: cheapest frontier point {cheapest:.4f} GFLOPs (median), hypervolume {hv:.5f}")
    shares = sorted(first_reaching(e, reference, grid_hv) / grid_compute for e in runs["default"])
    print("default's compute to reach the grid's hypervolume, per seed (x grid): "
          + ", ".join(f"{s:.2f}" for s in shares))
    _plot(at, medians, grid, grid_compute, reference)
    cost, chosen = oracle(curves, grid_hv, reference)
    print(f"ceiling: a search that knew the table would reach the grid's hypervolume at {cost / grid_compute:.2f} "
          f"of its compute, training {' + '.join(chosen)}")
    print(f"wrote {OUT}; {time.time() - start:.0f} s in all")
    print(f"compute_to_grid_hv: {statistics.median(shares):.2f}")


def oracle(curves, target: float, reference) -> tuple[float, tuple[str, ...]]:
    """The cheapest set of at most ORACLE_SET_SIZE recorded configurations, each trained for every epoch, whose
    hypervolume reaches target: (its compute, its configurations)."""
    full = {c.config: EPOCHS * sum(c.charged_s) for c in curves}
    best: tuple[float, tuple[str, ...]] = (math.inf, ())
    for size in range(1, ORACLE_SET_SIZE + 1):
        for chosen in itertools.combinations(curves, size):
            cost = sum(full[c.config] for c in chosen)
            if cost < best[0] and hypervolume([(c.epochs[-1][0], c.gflops) for c in chosen], reference) >= target:
                best = (cost, tuple(c.config for c in chosen))
    return best


def _plot(at, medians, grid, grid_compute, reference) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    xs = [x / grid_compute for x in at]
    for name, values in medians.items():
        ax.plot(xs, values, label=f"{name} (median of {SEEDS} seeds)")
    ax.plot(xs, curve(grid, reference, at), "k--", label="grid (the paper's rule)")
    ax.set_xlabel("compute charged (x the grid's total)")
    ax.set_ylabel("hypervolume (AP up, GFLOPs down)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT)
    plt.close(fig)


if __name__ == "__main__":
    main()
