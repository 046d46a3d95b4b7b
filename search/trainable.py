"""The Tune function trainable of one trial: budget check, then the training loop, in the trial itself for one
worker, or in a Ray Train TorchTrainer's workers for several.

One worker trains in the trial's own process, with Tune's checkpoints: a nested TorchTrainer costs about 20 s a
trial here (its controller, worker group and storage set-up), against about 2 s for a plain Tune trainable, and
with one worker there is nothing for it to coordinate.

Train's metrics reach Tune through a small forwarding callback rather than ray.tune's TuneReportCallback.
With Ray 2.60, TuneReportCallback deadlocks when the TorchTrainer returns while its last report is still
queued between actors: the trial's main thread then blocks putting that report into a result queue that
already holds the end-of-function marker (seen here in a 2-epoch trial; the trial never finishes).
Reporting from this function's own thread, in order, and returning only after the last one is consumed,
avoids that race.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ray.train
import ray.tune
import torch
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2.api.callback import UserCallback
from ray.util.queue import Queue

from search.job import Job, ResourcesConfig
from search.logged_model import MODEL_FOLDER, save_model_folder
from search.states import FULL_BUDGET_KEY
from spaces import check_budget
from trainers.annotations import TrainingData
from trainers.loop import TrialPlan, fit, train_worker
from trainers.recipe import TrainConfig
from trainers.spec import ModelSpec
from trainers.typed import from_mapping

# A multi-worker trial's driver only waits on its TorchTrainer, so it reserves no CPU: a sliver of CPU (0.01)
# left a 4-CPU GPU node 3.99 free, and the next trial's workers no longer fit there together (tests/
# test_cluster.py saw one split over two nodes). Ray needs a nonzero reservation to place it: the driver
# reserves (logical) memory, which is what it does take: a process with torch imported, about 0.5 GB.
DRIVER_MEMORY_BYTES = 512 * 2**20
CHECKPOINT_PATH_KEY = "checkpoint_path"
# Per trial: the newest to resume from, and the one before it in case the newest was cut off mid-write.
CHECKPOINTS_KEPT = 2
_DONE = "__effsearch_train_done__"


class ForwardReports(UserCallback):
    """Runs in Train's controller: passes rank 0's metrics (and checkpoint path) to the trial's driver."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        item = dict(metrics[0])
        if checkpoint is not None:
            item[CHECKPOINT_PATH_KEY] = checkpoint.path
        self.queue.put(item)


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a search shares, built once by the driver: the typed job and the indexed data.

    Tune stores it in the object store once (tune.with_parameters); it is never turned back into a dict.
    """

    job: Job
    data: TrainingData
    storage_path: str
    # What each worker of a multi-worker trial runs, and the torch.distributed backend (None: Ray Train's
    # choice, NCCL on GPUs). Tests of placement on fake GPUs replace the loop and use gloo; nothing else does.
    worker_loop: Callable[[dict], None] = train_worker
    torch_backend: str | None = None


def run_trial(config: dict, *, setup: TrialSetup) -> None:
    """config is what the search space proposed ({"spec": {...}}, and "train" where the training space is
    searched); setup holds everything constant."""
    job = setup.job
    spec = ModelSpec.from_dict({**config["spec"], "num_classes": setup.data.train.num_classes}, where="trial spec")
    # Rejected before any worker starts: an over-budget configuration costs no accelerator time.
    check_budget(spec, job.search.max_gflops, job.search.max_params_m)
    resources = job.resources
    plan = TrialPlan(spec=spec, data=setup.data, recipe=trial_recipe(job.train, config),
                     backbone_weights=job.model.backbone_weights, cpus_per_worker=resources.cpus_per_worker)
    if trains_in_trial(resources):
        _fit_in_trial(plan, resources)
        return
    queue = Queue(actor_options={"num_cpus": 0})
    _fit_and_forward(_torch_trainer(plan, setup, ForwardReports(queue)), queue)


def add_model_folder(metrics: dict, checkpoint_dir: str | None) -> None:
    """Before a trial's last report: its MLflow model folder into the checkpoint, saved here on the trial's own
    cores rather than by the search's driver (search/logged_model.py). A save that fails leaves no folder, and
    the report goes on: the driver then exports the model itself, and if that fails too, the run is recorded as
    failed with the reason and keeps its metrics."""
    if checkpoint_dir and metrics.get(FULL_BUDGET_KEY) == 1:
        try:
            save_model_folder(checkpoint_dir)
        except Exception as err:  # noqa: BLE001 (any failure: the trial's metrics must still be reported)
            shutil.rmtree(Path(checkpoint_dir) / MODEL_FOLDER, ignore_errors=True)
            logging.getLogger(__name__).warning("saving the trial's model failed, the driver will try: %s", err)


def trial_recipe(recipe: TrainConfig, config: dict) -> TrainConfig:
    """The job's training settings with the ones this trial's proposal searched (config["train"]) in their place."""
    searched = config.get("train") or {}
    return from_mapping(TrainConfig, {**recipe.to_dict(), **searched}, "trial train") if searched else recipe


def trains_in_trial(resources: ResourcesConfig) -> bool:
    """One worker trains in the Tune trial's own process; several in a TorchTrainer's workers."""
    return resources.workers_per_trial == 1


def trial_resources(resources: ResourcesConfig) -> dict:
    """What Tune reserves for each trial: the one worker's own share, or a driver's token share beside the
    TorchTrainer's workers (which reserve their own)."""
    if trains_in_trial(resources):
        return {"cpu": resources.cpus_per_worker, "gpu": resources.gpus_per_worker}
    return {"cpu": 0, "memory": DRIVER_MEMORY_BYTES}


def trial_retries(resources: ResourcesConfig) -> int:
    """How often Tune restarts a failed trial: a one-worker trial's crashes are Tune's to retry, from its last
    checkpoint; a TorchTrainer restarts its own workers (resources.max_failures), so Tune does not retry too."""
    return resources.max_failures if trains_in_trial(resources) else 0


def _fit_in_trial(plan: TrialPlan, resources: ResourcesConfig) -> None:
    """The loop in this process: Ray has set CUDA_VISIBLE_DEVICES to the trial's GPU, which is cuda:0 here."""
    if resources.gpus_per_worker > 0 and not torch.cuda.is_available():
        raise RuntimeError(f"resources.gpus_per_worker is {resources.gpus_per_worker}, but the trial's process "
                           f"sees no CUDA device")
    device = torch.device("cuda", 0) if resources.gpus_per_worker > 0 else torch.device("cpu")

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        add_model_folder(metrics, checkpoint_dir)
        # Tune copies the folder into the trial's storage before report returns; the loop then deletes it.
        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(checkpoint_dir)
                        if checkpoint_dir else None)

    checkpoint = ray.tune.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as resume_from:
        fit(plan, report, device=device, resume_from=resume_from)


def _torch_trainer(plan: TrialPlan, setup: TrialSetup, forward: ForwardReports) -> TorchTrainer:
    resources, storage_path = setup.job.resources, setup.storage_path
    use_gpu = resources.gpus_per_worker > 0
    per_worker = {"CPU": resources.cpus_per_worker, **({"GPU": resources.gpus_per_worker} if use_gpu else {})}
    trial_id = ray.tune.get_context().get_trial_id()
    return TorchTrainer(
        setup.worker_loop,
        train_loop_config={"plan": plan, "before_report": add_model_folder},
        # PACK (Train's default, named because placement matters): a trial's workers share a node when they
        # fit, so NCCL and SyncBN run over NVLink, and spread over nodes only when no one node holds them all.
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.workers_per_trial, use_gpu=use_gpu, resources_per_worker=per_worker,
            placement_strategy="PACK"),
        torch_config=TorchConfig(backend=setup.torch_backend),
        # The fixed name makes a restarted trial's TorchTrainer continue from the same run's last checkpoint.
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}", storage_path=storage_path, callbacks=[forward],
            failure_config=ray.train.FailureConfig(max_failures=resources.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT)),
    )


def _fit_and_forward(trainer: TorchTrainer, queue: Queue) -> None:
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # re-raised in the trial's thread below, so Tune marks the trial failed
            failure.append(err)
        finally:
            queue.put(_DONE)

    thread = threading.Thread(target=fit, name="torch-trainer", daemon=True)
    thread.start()
    while (item := queue.get()) != _DONE:
        ray.tune.report(item)
    thread.join()
    if failure:
        raise failure[0]
