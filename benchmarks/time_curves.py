"""Times every configuration of the replay table (benchmarks/curves.csv) again, under one set of conditions, and
writes benchmarks/curve_timings.csv: the seconds the replay charges per epoch.

Why: the recording ran for 140 minutes on a shared machine, and its epochs were slowed by other work for stretches
(up to 4x). Its seconds say more about when a configuration was recorded than about what it costs: c30 and c33
are the same network, and their fastest recorded epochs differ by half (267 s and 399 s for six epochs). The
paper's rule was recorded first, on the quietest stretch. search_efficiency charges compute, so its comparison
needs each configuration's cost, not the machine's load at the time.

Method, fixed before any result was seen:
- each configuration's model spec is rebuilt from its recorded sizes and the CPU preset's fixed fields, and its
  GFLOPs must equal the recorded figure (a check that the timed network is the recorded one);
- each run trains it with the project's own loop (`trainers.loop.fit`) on the recording's data (400 / 100 shapes
  images) and recipe, for 2 epochs evaluated every epoch, two 1-core runs side by side as in the recording;
  epoch 2 is the one kept (epoch 1 also decodes the images into the cache, as only the first epoch does);
- ROUNDS rounds, each over every configuration in its own seeded random order, so that a slow stretch of the
  machine falls on different configurations in each round;
- the charge per configuration is the median over rounds of epoch 2's training seconds, and of its evaluation
  seconds. Every run's figures are written.
Like record_curves.py, this records rather than benchmarks: about an hour on 2 cores, run alone (other work on the
machine is what it corrects for), in the background.
Headline: the median over configurations of the spread of the training seconds over rounds ((max - min) / median),
printed as `timing_spread:`, with the two pairs of identical networks compared above it.
"""
from __future__ import annotations

import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search.replay import MATCHED, TIMINGS_CSV, load_curves, write_timings  # noqa: E402

# TIME_CURVES_SMOKE=1: 2 configurations, 1 round, on 40 / 20 images, written into the work folder: the script end
# to end in a few minutes, before the long run.
SMOKE = os.environ.get("TIME_CURVES_SMOKE") == "1"
ROUNDS = 1 if SMOKE else 3
EPOCHS = 2
TRAIN_IMAGES, VAL_IMAGES = (40, 20) if SMOKE else (400, 100)
RECIPE = {"epochs": EPOCHS, "eval_every": 1, "batch_size": 16, "lr": 0.01, "warmup_epochs": 0.5}
SAME_NETWORK = (("c30", "c33"), ("c36", "c39"))


def recorded_spec(sizes: tuple[float, ...]) -> dict:
    """The model spec the recording trained: the CPU compound space's own spec (the rule at phi 0) with the recorded
    sizes in place of its own, and the anchors the space scales to that input size."""
    import optuna

    from spaces import enqueued_params, make_space
    from spaces.compound import CPU_BOUNDS

    (point,) = enqueued_params("compound", ["rule:0"], {"preset": "cpu"})
    spec = {**make_space("compound", {"preset": "cpu"})(optuna.trial.FixedTrial(point))["spec"],
            **dict(zip(MATCHED, sizes))}
    for key in ("image_size", "fpn_channels", "fpn_repeats", "head_repeats"):
        spec[key] = int(spec[key])
    spec["anchor_scale"] = CPU_BOUNDS.anchor_at(spec["image_size"], CPU_BOUNDS.base_resolution)
    return spec


def time_one(task: tuple[str, int, dict, dict]) -> dict:
    """One run in a fresh worker process: epoch 2's training and evaluation seconds."""
    config, round_, spec_dict, shapes = task
    from trainers.loop import TrialPlan, fit
    from trainers.recipe import TrainConfig
    from trainers.spec import ModelSpec
    from trainers.validate import load_training_data

    data, _ = load_training_data(shapes["train"]["annotations"], shapes["train"]["images"],
                                 shapes["val"]["annotations"], shapes["val"]["images"], check="headers",
                                 say=lambda _: None)
    spec = ModelSpec.from_dict({**spec_dict, "num_classes": data.train.num_classes}, where=config)
    plan = TrialPlan(spec=spec, data=data, recipe=TrainConfig(**RECIPE), cpus_per_worker=1)
    epochs = {}
    fit(plan, lambda metrics, checkpoint: epochs.setdefault(metrics["epoch"], metrics))
    kept = epochs[EPOCHS]
    return {"config": config, "round": round_, "epoch_s": kept["epoch_s"], "eval_s": kept["eval_s"],
            "first_epoch_s": epochs[1]["epoch_s"]}


def main() -> None:
    from trainers.cost import model_cost
    from trainers.shapes import make_shapes
    from trainers.spec import ModelSpec

    curves = load_curves()
    specs = {}
    for curve in curves:
        spec = recorded_spec(curve.sizes)
        gflops = model_cost(ModelSpec.from_dict({**spec, "num_classes": 3}, where=curve.config)).gflops
        if abs(gflops - curve.gflops) > 1e-6 * curve.gflops:
            raise SystemExit(f"{curve.config}: the rebuilt spec counts {gflops} GFLOPs, the recording {curve.gflops}")
        specs[curve.config] = spec
    if SMOKE:
        specs = {config: specs[config] for config in ("c00", "c30")}
    work = Path(tempfile.mkdtemp(prefix="time-curves-"))
    made = make_shapes(work / "shapes", train_images=TRAIN_IMAGES, val_images=VAL_IMAGES)
    shapes = {split: {k: str(v) for k, v in paths.items()} for split, paths in made.items()}
    tasks = []
    for round_ in range(ROUNDS):
        order = sorted(specs)
        random.Random(round_).shuffle(order)
        tasks += [(config, round_, specs[config], shapes) for config in order]
    print(f"{len(specs)} configurations (GFLOPs checked against the recording) x {ROUNDS} rounds, "
          f"2 runs side by side; work in {work}", flush=True)
    start, rows = time.time(), []
    # A fresh process per run (maxtasksperchild=1), as each recorded trial had: no cache or allocator state
    # carries from one configuration to the next.
    with multiprocessing.get_context("spawn").Pool(2, maxtasksperchild=1) as pool:
        for row in pool.imap_unordered(time_one, tasks):
            rows.append(row)
            print(f"[{time.time() - start:5.0f} s] {row['config']} round {row['round']}: epoch {row['epoch_s']:.1f} s, "
                  f"eval {row['eval_s']:.1f} s ({len(rows)}/{len(tasks)})", flush=True)
    rows.sort(key=lambda r: (r["config"], r["round"]))
    out = work / TIMINGS_CSV.name if SMOKE else TIMINGS_CSV
    write_timings(out, rows)
    print(f"wrote {out}", flush=True)

    by_config = {c: [r["epoch_s"] for r in rows if r["config"] == c] for c in specs}
    median = {c: statistics.median(v) for c, v in by_config.items()}
    for a, b in SAME_NETWORK if not SMOKE else ():
        recorded = {c.config: 6 * sum(c.recorded_charge_s) for c in curves if c.config in (a, b)}
        print(f"same network {a}/{b}: timed epoch {median[a]:.1f} / {median[b]:.1f} s; "
              f"recorded 6-epoch charge {recorded[a]:.0f} / {recorded[b]:.0f} s")
    spreads = [(max(v) - min(v)) / median[c] for c, v in by_config.items()]
    print(f"timing_spread: {statistics.median(spreads):.3f}")


if __name__ == "__main__":
    main()
