"""The Tune function trainable ("driver") of one trial: budget check, then a Ray Train TorchTrainer."""
from __future__ import annotations

import ray.train
import ray.tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from spaces import check_budget
from trainers.loop import train_worker
from trainers.spec import ModelSpec

# The driver only waits on its TorchTrainer; Ray needs a nonzero reservation to place it.
DRIVER_CPUS = 0.01


def run_trial(config: dict, *, job: dict) -> None:
    """config is what the search space proposed ({"spec": {...}, ...}); job holds everything constant."""
    spec = ModelSpec.from_dict({**config["spec"], "num_classes": job["num_classes"]}, where="trial spec")
    # Rejected before any worker starts: an over-budget configuration costs no accelerator time.
    check_budget(spec, job["max_gflops"])
    resources = job["resources"]
    use_gpu = resources["gpus_per_worker"] > 0
    per_worker = {"CPU": resources["cpus_per_worker"]}
    if use_gpu:
        per_worker["GPU"] = resources["gpus_per_worker"]
    train = dict(job["train"])
    train.setdefault("threads", 0)
    if not train["threads"] and not use_gpu:
        train["threads"] = resources["cpus_per_worker"]
    trial_id = ray.tune.get_context().get_trial_id()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"spec": spec.to_dict(), "data": job["data"], "train": train},
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources["workers_per_trial"], use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}", storage_path=job["storage_path"], callbacks=[TuneReportCallback()]),
    )
    trainer.fit()
