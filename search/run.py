"""Runs one search: Ray Tune trials proposed by OptunaSearch on (AP, GFLOPs), recorded in MLflow."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import mlflow
import optuna
import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from search.frontier import TrialPoint, record_frontier
from search.job import Job
from search.progress import ProgressPrinter
from search.tracking import DEFAULT_STORE, MlflowTrialLogger, ensure_experiment, tracking_uri
from search.trainable import DRIVER_CPUS, run_trial
from spaces import METRICS, MODES, SPACES
from trainers.validate import check_same_categories, validate_split


@dataclass(frozen=True)
class SearchOutcome:
    experiment_id: str
    parent_run_id: str
    frontier: list[TrialPoint]
    finished: int
    failed: int


def run_search(job: Job, *, ray_address: str | None = None, store: Path = DEFAULT_STORE,
               say: Callable[[str], None] = print) -> SearchOutcome:
    # Bad data fails here, in one line, before any run is created or any worker starts.
    reports = {split: validate_split(getattr(job.data, split).annotations, getattr(job.data, split).images)
               for split in ("train", "val")}
    check_same_categories(reports["train"], reports["val"])
    for report in reports.values():
        say(f"data: {report.summary()}")
    num_classes = len(reports["train"].category_ids)
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)

    experiment_id = ensure_experiment(client, job.name)
    parent = client.create_run(experiment_id, run_name=f"search-{time.strftime('%Y%m%d-%H%M%S')}",
                               tags={"effsearch.kind": "search"})
    parent_id = parent.info.run_id
    for key, value in _flat_params(job).items():
        client.log_param(parent_id, key, value)
    for split, report in reports.items():
        client.set_tag(parent_id, f"effsearch.data.{split}", report.summary()[:5000])

    store = store.resolve()
    storage_path = str(store / "ray")
    trial_job = {
        "num_classes": num_classes,
        "max_gflops": job.search.max_gflops,
        "resources": asdict(job.resources),
        "train": job.train.to_dict(),
        "data": {
            "train_annotations": job.data.train.annotations, "train_images": job.data.train.images,
            "val_annotations": job.data.val.annotations, "val_images": job.data.val.images,
            "images_checked": True,  # just above, once for the whole search
        },
        "storage_path": storage_path,
    }
    _start_ray(ray_address)
    searcher = OptunaSearch(
        SPACES[job.search.space], metric=METRICS, mode=MODES,
        sampler=optuna.samplers.TPESampler(seed=job.search.seed, n_startup_trials=max(2, job.search.trials // 3)),
        study_name=job.name, storage=_optuna_storage(store / "optuna.journal"))
    logger = MlflowTrialLogger(client, experiment_id, parent_id, job.train.epochs)
    progress = ProgressPrinter(job.search.trials, job.train.epochs)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(run_trial, job=trial_job), {"cpu": DRIVER_CPUS}),
        tune_config=tune.TuneConfig(
            search_alg=searcher, num_samples=job.search.trials,
            max_concurrent_trials=job.search.max_concurrent_trials),
        run_config=tune.RunConfig(
            name=f"{job.name}-{parent_id[:8]}", storage_path=storage_path, callbacks=[logger, progress],
            verbose=0, failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
    )
    status = "FINISHED"
    try:
        results = tuner.fit()
    except BaseException:
        status = "KILLED"
        raise
    finally:
        # Whatever happened, the trials already recorded keep their frontier tags and the parent is closed.
        frontier = record_frontier(client, experiment_id, parent_id)
        client.set_terminated(parent_id, status)
    failed = sum(1 for r in results if r.error is not None)
    return SearchOutcome(experiment_id, parent_id, frontier, len(results) - failed, failed)


def _start_ray(address: str | None) -> None:
    if ray.is_initialized():
        return
    logging.getLogger("ray").setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Tune's own console tables would interleave with ProgressPrinter's lines; with the legacy output
    # engine, verbose=0 is silent.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    # Each trial's driver reserves DRIVER_CPUS and does no compute; one spare logical CPU lets the drivers
    # sit beside workers that reserve whole cores.
    ray.init(num_cpus=(os.cpu_count() or 1) + 1, include_dashboard=False, log_to_driver=False,
             configure_logging=True, logging_level=logging.WARNING)


def _optuna_storage(path: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def _flat_params(job: Job) -> dict:
    flat = {}
    for section in ("search", "train", "resources"):
        for key, value in asdict(getattr(job, section)).items():
            flat[f"{section}.{key}"] = value
    flat["data.train"] = job.data.train.annotations
    flat["data.val"] = job.data.val.annotations
    return flat
