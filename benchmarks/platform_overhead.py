"""What the platform adds to a trial's wall time: one 1-worker trial of the demo's default variant through a real
search (Ray Tune, the searcher, MLflow), against the same training run bare (`trainers.loop.fit` in this process).

Both train the demo job's first configuration (the paper's rule at phi 0 in the demo's space) with the demo's
recipe and resources (1 worker of 1 core) on the demo's shapes data, for 5 epochs, evaluating every epoch.

Estimator, fixed before any result was seen:
- trial wall time: from Tune's trial start (on_trial_start, before its process is placed) to its last report
  (on_trial_result of the final epoch), both seen by the search's driver;
- bare wall time: from the call of `fit` to its return, in this process, with the thread count the trial gets;
- six runs, interleaved bare, search, search, bare, bare, search, so that a slow drift of a shared machine falls
  on both sides alike; the headline is median(trial) / median(bare) - 1 over the three of each side, printed as
  `overhead_ratio:` with the per-run figures above it. Goal: <= 0.05.
  (Until 2026-11-23 it was four runs, two a side. Their spread, 12 s between the two search runs, was twice
  the 6 s that the goal allows, so the median of two could not tell 0.04 from 0.06; the change was made
  before the six-run figures were seen.)
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray import tune  # noqa: E402


# The demo trains 6 epochs since 2026-12-06; this stays at the 5 it was measured with, so that six runs fit the
# 15-minute limit. The platform's cost is per trial and per epoch, so a longer trial does not raise the ratio.
EPOCHS = 5


class TrialClock(tune.Callback):
    """Driver-side times of the trial's start and of its final report."""

    def __init__(self):
        self.started: float | None = None
        self.last_report: float | None = None

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started = time.perf_counter()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("full_budget") == 1:
            self.last_report = time.perf_counter()


def one_trial_job(folder: Path):
    from search.demo import demo_job

    _, job = demo_job(folder, epochs=EPOCHS)
    search = replace(job.search, trials=1, max_concurrent_trials=1, scheduler="fifo", enqueue=["rule:0"])
    return replace(job, search=search, model_name=None)


def search_wall(job, work: Path, number: int) -> float:
    from search.run import run_search

    clock = TrialClock()
    folder = work / f"search-{number}"
    folder.mkdir()
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    outcome = run_search(replace(job, name=f"overhead-{number}"), store=folder / "store", say=lambda _: None,
                         callbacks=[clock])
    if outcome.finished != 1 or clock.started is None or clock.last_report is None:
        raise SystemExit(f"the search's trial did not finish: {outcome}")
    return clock.last_report - clock.started


def bare_wall(job) -> float:
    from search.trainable import run_trial  # noqa: F401  (the trial's imports, loaded before the clock starts)
    from spaces import enqueued_params, make_space
    from trainers.loop import TrialPlan, fit
    from trainers.spec import ModelSpec
    from trainers.validate import load_training_data

    import optuna

    space = make_space(job.search.space, job.search.bounds)
    (params,) = enqueued_params(job.search.space, job.search.enqueue, job.search.bounds)
    spec_dict = space(optuna.trial.FixedTrial(params))["spec"]
    data, _ = load_training_data(
        job.data.train.annotations, job.data.train.images, job.data.val.annotations, job.data.val.images,
        check=job.data.check, cache_bytes_per_node=int(job.data.cache_gib * 2**30), say=lambda _: None)
    spec = ModelSpec.from_dict({**spec_dict, "num_classes": data.train.num_classes}, where="bare run")
    plan = TrialPlan(spec=spec, data=data, recipe=job.train, cpus_per_worker=job.resources.cpus_per_worker)
    start = time.perf_counter()
    last = fit(plan, lambda metrics, checkpoint: None)
    wall = time.perf_counter() - start
    if last.get("full_budget") != 1:
        raise SystemExit("the bare run did not finish")
    return wall


def main() -> None:
    import ray

    work = Path(tempfile.mkdtemp(prefix="platform-overhead-"))
    os.chdir(work)  # the demo job's data paths are relative to its folder
    job = one_trial_job(work)
    print(f"{job.search.space} {job.search.enqueue[0]}, {job.train.epochs} epochs, "
          f"{job.resources.workers_per_trial} worker x {job.resources.cpus_per_worker} core; work in {work}",
          flush=True)
    bare, trial = [], []
    for number, side in enumerate(("bare", "search", "search", "bare", "bare", "search")):
        if side == "bare":
            bare.append(bare_wall(job))
        else:
            trial.append(search_wall(job, work, number))
            ray.shutdown()
        print(f"run {number + 1} ({side}): {(bare if side == 'bare' else trial)[-1]:.1f} s", flush=True)
    ratio = statistics.median(trial) / statistics.median(bare) - 1
    print(f"bare {', '.join(f'{w:.1f}' for w in bare)} s; trial in a search {', '.join(f'{w:.1f}' for w in trial)} s")
    print(f"overhead_ratio: {ratio:.3f}")


if __name__ == "__main__":
    main()
