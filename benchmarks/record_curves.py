"""Records the replay table (benchmarks/curves.csv): configurations of the CPU-sized compound space trained on the
shapes data through the normal search path, with AP, GFLOPs and seconds per epoch for every epoch.

The configurations: the paper's rule at each phi step of the space (0, 0.25, ..., 1), then a scrambled Sobol
design over all of the space's parameters (Optuna's QMCSampler), without repeats, up to CONFIGS in all. A
40-point grid over 7 parameters would leave under 2 levels per parameter; the Sobol points give each parameter
40 distinct values, which is what a replay that serves the nearest recorded configuration needs.

Every trial is enqueued (search.enqueue) and runs to the end (scheduler fifo), evaluated every epoch, two
1-core trials side by side as in the demo. Takes about an hour on 2 cores; run it in the background.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402
import yaml  # noqa: E402

from search.replay import CURVES_CSV, MATCHED, write_curves  # noqa: E402
from spaces import enqueued_params, make_space, space_parameters  # noqa: E402

# RECORD_CURVES_SMOKE=1: 2 configurations x 2 epochs on 40 images, written beside the work folder, to check the
# script end to end in two minutes before the hour-long run.
SMOKE = os.environ.get("RECORD_CURVES_SMOKE") == "1"
CONFIGS = 2 if SMOKE else 40
EPOCHS = 2 if SMOKE else 6
TRAIN_IMAGES, VAL_IMAGES = (40, 20) if SMOKE else (400, 100)
BOUNDS = {"preset": "cpu"}
RULE = [f"rule:{phi}" for phi in (0, 0.25, 0.5, 0.75, 1)]


def design() -> list[dict]:
    """The rule's points, then Sobol points, each a distinct model spec."""
    space = make_space("compound", BOUNDS)
    distributions = space_parameters(space)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=0))
    points, seen = [], set()
    candidates = enqueued_params("compound", RULE, BOUNDS)
    while len(points) < CONFIGS:
        params = candidates.pop(0) if candidates else study.ask(fixed_distributions=distributions).params
        spec = space(optuna.trial.FixedTrial(params))["spec"]
        key = json.dumps(spec, sort_keys=True)
        if key not in seen:
            seen.add(key)
            points.append(params)
    return points


def main() -> None:
    from mlflow.tracking import MlflowClient

    from search.job import parse_job
    from search.run import run_search
    from trainers.shapes import make_shapes

    work = Path(tempfile.mkdtemp(prefix="record-curves-"))
    shapes = make_shapes(work / "shapes", train_images=TRAIN_IMAGES, val_images=VAL_IMAGES)
    points = design()
    raw = {
        "name": "record-curves",
        "data": {split: {"annotations": str(paths["annotations"]), "images": str(paths["images"])}
                 for split, paths in shapes.items()},
        "search": {"space": "compound", "bounds": BOUNDS, "trials": len(points), "max_concurrent_trials": 2,
                   "scheduler": "fifo", "sampler": "random", "enqueue": points},
        "train": {"epochs": EPOCHS, "eval_every": 1, "batch_size": 16, "lr": 0.01, "warmup_epochs": 0.5},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
    }
    (work / "job.yaml").write_text(yaml.safe_dump(raw))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    print(f"recording {len(points)} configurations x {EPOCHS} epochs in {work}", flush=True)
    start = time.time()
    outcome = run_search(parse_job(raw), store=work / "store")
    print(f"search: {outcome.finished} finished, {outcome.failed} failed, {time.time() - start:.0f} s", flush=True)

    rows = recorded_rows(MlflowClient(), outcome.experiment_id, outcome.parent_run_id)
    out = work / "curves.csv" if SMOKE else CURVES_CSV
    write_curves(out, rows)
    print(f"wrote {out}", flush=True)
    print(f"configurations_recorded: {len(rows) // EPOCHS}")


def recorded_rows(client, experiment_id: str, parent_run_id: str) -> list[dict]:
    """The table's rows from the search's child runs: every epoch of each trial that scored all EPOCHS."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                              max_results=1000)
    rows = []
    for number, run in enumerate(sorted(runs, key=lambda r: r.info.start_time)):
        params = run.data.params
        history = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
                   for key in ("map", "epoch_s", "eval_s")}
        if sorted(history["map"]) != list(range(1, EPOCHS + 1)):
            print(f"skipped {run.info.run_name}: AP recorded for epochs {sorted(history['map'])}", flush=True)
            continue
        for epoch in range(1, EPOCHS + 1):
            rows.append({"config": f"c{number:02d}", **{key: params[key] for key in MATCHED},
                         "gflops": run.data.metrics["gflops"], "params_m": run.data.metrics["params_m"],
                         "epoch": epoch, "map": history["map"][epoch], "epoch_s": history["epoch_s"][epoch],
                         "eval_s": history["eval_s"][epoch]})
    return rows


if __name__ == "__main__":
    main()
