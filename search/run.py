"""Runs one search: Ray Tune trials proposed by OptunaSearch on (AP, GFLOPs), recorded in MLflow."""
from __future__ import annotations

import functools
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import mlflow
import optuna
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from search.continuation import SearchRecord, check_warm_start, record_to_resume, save_record, warm_start
from search.data_errors import StopAtDataError
from search.frontier import TrialPoint, record_frontier
from search.interrupts import held_interrupts
from search.job import STORAGE_VARIABLE, Job, JobError, storage_location
from search.lineage import SPLIT_HASH_TAG, Comparable, split_hashes, training_key
from search.progress import ProgressPrinter
from search.ray_runtime import cluster_address, start_ray, trials_the_cluster_holds
from search.scheduler import make_scheduler
from search.searcher import Budget, BudgetedOptunaSearch, CostCounter
from search.tracking import (DEFAULT_STORE, REASON_TAG, WARM_START_TAG, close_open_runs, ensure_experiment,
                             tracking_uri)
from search.trainable import CHECKPOINTS_KEPT, TrialSetup, run_trial, trial_resources, trial_retries
from search.states import FULL_BUDGET_KEY
from search.trial_runs import MlflowTrialLogger, error_line
from spaces import METRICS, MODES, enqueued_params, make_space, space_parameters
from trainers.annotations import TrainingData
from trainers.words import counted
from trainers.validate import DataError, load_training_data


@dataclass(frozen=True)
class SearchOutcome:
    experiment_id: str
    parent_run_id: str
    frontier: list[TrialPoint]
    finished: int
    failed: int
    first_error: str = ""  # the first failed trial's one-line reason
    # With search.max_gflops: the share of the sampler's proposals within budget, first and second half.
    feasible_share: tuple[float, float] | None = None
    pruned: int = 0  # of the finished trials, those the scheduler stopped early
    # When the search failed (no trial finished, or a trial met a fault in the data): why, in one line (the parent
    # run's effsearch.reason).
    failure: str = ""


def run_search(job: Job, *, ray_address: str | None = None, store: Path = DEFAULT_STORE,
               say: Callable[[str], None] = print, trainable: Callable = run_trial,
               callbacks: Sequence[tune.Callback] = (), resume: bool = False,
               warm_start_from: str | None = None) -> SearchOutcome:
    """Run job's search; `trainable` is what each trial runs (the real one by default), `callbacks` extra Tune
    callbacks. `resume` continues the job's interrupted search (its parent run, Tune folder and Optuna study;
    the callbacks are then the first run's); `warm_start_from` seeds a new search's study with the complete trials
    of that job's search in the same store. Whatever happens, every MLflow run it created ends FINISHED, FAILED
    or KILLED."""
    store = store.resolve()
    record = record_to_resume(store, job.name) if resume else None
    space = _space(job)
    journal = _optuna_storage(store / "optuna.journal")
    warm_trials = None
    if warm_start_from and record is None:  # a bad --warm-start fails before the data is read or a run exists
        warm_trials = check_warm_start(journal, warm_start_from, job.name, space_parameters(space))
    # Bad data fails here, in one line, before any run is created or Ray starts. The annotations are parsed
    # once, here, and every worker gets the compact index.
    data, reports = load_training_data(
        job.data.train.annotations, job.data.train.images, job.data.val.annotations, job.data.val.images,
        check=job.data.check, cache_bytes_per_node=int(job.data.cache_gib * 2**30), say=say)
    for report in reports.values():
        say(f"data: {report.summary()}")
    _check_fits(job, data, space)
    address = cluster_address(ray_address)  # a cluster that does not answer fails here, before any run exists
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)

    experiment_id = ensure_experiment(client, job.name)
    hashes = split_hashes({"train": job.data.train.annotations, "val": job.data.val.annotations})
    comparable = Comparable.of(hashes, job.train.epochs)
    if record is not None:
        parent_id = record.parent_run_id
        client.update_run(parent_id, status="RUNNING")
        say(f"resuming the search of parent run {parent_id} from {record.tune_path}")
    else:
        parent_id = client.create_run(experiment_id, run_name=f"search-{time.strftime('%Y%m%d-%H%M%S')}",
                                      tags={"effsearch.kind": "search"}).info.run_id
    status, children_status, ended = "FAILED", "FAILED", False
    try:
        if record is None:
            params = [mlflow.entities.Param(key, str(value)) for key, value in _flat_params(job).items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                client.log_batch(parent_id, params=params[start:start + 100])
            for split, report in reports.items():
                client.set_tag(parent_id, f"effsearch.data.{split}", report.summary()[:5000])
            for split, digest in hashes.items():
                client.set_tag(parent_id, SPLIT_HASH_TAG.format(split=split), digest)
            for key, value in comparable.tags().items():
                client.set_tag(parent_id, key, value)
        if warm_start_from and record is None:
            copied = warm_start(journal, warm_start_from, job.name, MODES, space_parameters(space), _budget(job),
                                checked=warm_trials)
            client.set_tag(parent_id, WARM_START_TAG, warm_start_from)
            say(f"warm start: {copied} complete trials of {warm_start_from!r} seed this search's study")
        storage_path = _storage_path(job, store)
        setup = TrialSetup(job=job, data=data, storage_path=storage_path)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        start_ray(address)
        concurrency = _concurrency(job, say)
        searcher = BudgetedOptunaSearch(
            space, cost_of=CostCounter(data.train.num_classes, count_flops=job.search.max_gflops is not None),
            budget=_budget(job),
            metric=METRICS, mode=MODES, sampler=_sampler(job), points_to_evaluate=_enqueued(job, space),
            enqueued_labels=tuple(_label(entry, index) for index, entry in enumerate(job.search.enqueue)),
            study_name=job.name, storage=journal, fixed=job.search.fixed,
            trained_under=training_key(comparable, {"train": asdict(job.train), "model": asdict(job.model)}))
        logger = MlflowTrialLogger(client, experiment_id, parent_id, job.train.epochs, job.search.max_gflops,
                                   number_of=searcher.optuna_number, comparable=comparable,
                                   enqueued_of=searcher.enqueued_label, num_classes=data.train.num_classes,
                                   train_settings=asdict(job.train))
        searcher.on_infeasible = logger.record_infeasible
        runnable = tune.with_resources(tune.with_parameters(trainable, setup=setup),
                                       trial_resources(job.resources))
        if record is not None:
            # Tune restores its trials, the searcher and the scheduler from its folder; finished trials stay
            # finished, and interrupted ones restart from their last checkpoint (Tune's for one worker,
            # their Train run's for several).
            tuner = tune.Tuner.restore(record.tune_path, trainable=runnable, resume_unfinished=True)
        else:
            name = f"{job.name}-{parent_id[:8]}"
            tuner = tune.Tuner(
                runnable,
                tune_config=tune.TuneConfig(
                    search_alg=searcher, num_samples=job.search.trials,
                    scheduler=make_scheduler(job.search.scheduler, max_epochs=job.train.epochs,
                                             grace_period=job.search.grace_period,
                                             reduction_factor=job.search.reduction_factor),
                    max_concurrent_trials=concurrency,
                    # A trial's process is kept for the next: starting one (and importing torch in it) cost
                    # about 6 s a trial here (12 replayed trials: 98 s without, 26 s with).
                    reuse_actors=True),
                run_config=tune.RunConfig(
                    name=name, storage_path=storage_path,
                    callbacks=[logger, ProgressPrinter(job.search.trials, job.train.epochs), CSVLoggerCallback(),
                               JsonLoggerCallback(), StopAtDataError(searcher.halt), *callbacks],
                    # A one-worker trial trains in Tune's trial and resumes from Tune's checkpoints; several
                    # workers are restarted by their TorchTrainer instead, from Train's.
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
                    verbose=0, failure_config=tune.FailureConfig(max_failures=trial_retries(job.resources),
                                                                 fail_fast=False)),
            )
            save_record(store, job.name, SearchRecord(parent_id, _join(storage_path, name)))
        try:
            results = tuner.fit()
        except KeyboardInterrupt:
            status = children_status = "KILLED"
            raise
        finally:
            with held_interrupts():
                feasible_share = _record_proposals(client, parent_id, searcher, say)
        ended = True
        # A search in which no trial finished training has failed (the CLI exits 1): its parent run says so,
        # with the reason, rather than FINISHED.
        first_error = _first_error(results, searcher)
        failure = "" if any(r.error is None for r in results) else _no_trial_finished(len(results), first_error)
        if searcher.halted:  # a fault in the data fails the search, whatever finished before it
            hint = " (data.check: full finds every such image before a search starts)" if job.data.check != "full" \
                else ""
            failure = f"the search stopped at a fault in the data, which every trial would meet: {searcher.halted}{hint}"
        status = "FAILED" if failure else "FINISHED"
        if failure:
            client.set_tag(parent_id, REASON_TAG, failure[:4000])
    finally:
        # Whatever happened, no run is left RUNNING: an interrupted or crashed search ends its open trial
        # runs too, the trials already recorded keep their frontier tags, and the parent is closed even if
        # drawing the frontier fails. (A driver killed outright closes nothing; --resume continues it.) A second
        # Ctrl-C waits for this; a third stops the waiting (search/interrupts.py).
        with held_interrupts():
            try:
                close_open_runs(client, experiment_id, parent_id, children_status)
                frontier = record_frontier(client, experiment_id, parent_id, comparable, job.search.max_gflops)
            finally:
                client.set_terminated(parent_id, status)
                if ended:  # nothing left to resume
                    tune_path = record.tune_path if record else _join(storage_path, name)
                    save_record(store, job.name, SearchRecord(parent_id, tune_path, finished=True))
    failed = [r for r in results if r.error is not None]
    pruned = [r for r in results if r.error is None and (r.metrics or {}).get(FULL_BUDGET_KEY) != 1]
    return SearchOutcome(experiment_id, parent_id, frontier, len(results) - len(failed), len(failed), first_error,
                         feasible_share, len(pruned), failure)


def _first_error(results, searcher: BudgetedOptunaSearch) -> str | None:
    failed = [r for r in results if r.error is not None]
    return error_line(str(failed[0].error)) if failed else searcher.exhausted


def _no_trial_finished(trials: int, first_error: str | None) -> str:
    """The parent run's reason when no trial finished: the same words the CLI ends with."""
    if trials == 0:
        return f"no trial started: {first_error or 'the searcher proposed nothing'}"
    return f"no trial of {trials} finished training" + (f" (first failure: {first_error})" if first_error else "")


def _record_proposals(client: MlflowClient, parent_id: str, searcher: BudgetedOptunaSearch,
                      say: Callable[[str], None]) -> tuple[float, float] | None:
    """How many proposals were turned away (over budget, or repeats), on the parent run and the console."""
    if searcher.repeats:
        client.log_metric(parent_id, "repeated_proposals", searcher.repeats)
        say(f"search: {counted(searcher.repeats, 'proposal')} repeated a trained configuration and reused its results")
    if searcher.repeats_of_running:
        client.log_metric(parent_id, "repeated_running_proposals", searcher.repeats_of_running)
        say(f"search: {counted(searcher.repeats_of_running, 'proposal')} repeated a configuration still training "
            "and did not start")
    if searcher.exhausted:
        say(f"search ended early: {searcher.exhausted}")
    infeasible = sum(not ok for _, ok in searcher.proposals)
    share = searcher.feasible_share()
    if not infeasible or share is None:
        return share
    client.log_metric(parent_id, "infeasible_proposals", infeasible)
    client.log_metric(parent_id, "feasible_share_first_half", share[0])
    client.log_metric(parent_id, "feasible_share_second_half", share[1])
    say(f"budget: {infeasible} of {len(searcher.proposals)} proposals were over budget and never started; "
        f"within budget: {share[0]:.0%} of the first half, {share[1]:.0%} of the second")
    return share


def _storage_path(job: Job, store: Path) -> str:
    """Where trials checkpoint: the job's storage_path, else EFFSEARCH_STORAGE_PATH, else the driver's store (one
    machine). On a multi-node cluster it must be storage every node reaches, or a trial restarted on another node
    would not find its checkpoints."""
    if job.storage_path:
        return job.storage_path
    if os.environ.get(STORAGE_VARIABLE):
        return storage_location(os.environ[STORAGE_VARIABLE], STORAGE_VARIABLE, Path.cwd(), "environment")
    return str(store / "ray")


def _join(storage_path: str, name: str) -> str:
    """storage_path/name for a folder or a URI (pathlib would fold s3:// into s3:/)."""
    return f"{storage_path.rstrip('/')}/{name}"


def _concurrency(job: Job, say: Callable[[str], None]) -> int:
    """The job's max_concurrent_trials, else the trials the cluster holds now."""
    if job.search.max_concurrent_trials is not None:
        return job.search.max_concurrent_trials
    resources = job.resources
    per_worker = {"CPU": resources.cpus_per_worker, "GPU": resources.gpus_per_worker}
    held = trials_the_cluster_holds(per_worker, resources.workers_per_trial)
    say(f"concurrency: {counted(held, 'trial')} at once, what the cluster holds now (search.max_concurrent_trials sets it)")
    return held


def _budget(job: Job) -> Budget:
    return Budget(job.search.max_gflops, job.search.max_params_m)


def _sampler(job: Job) -> optuna.samplers.BaseSampler:
    """The job's Optuna sampler, seeded; search.fixed holds its parameters through PartialFixedSampler. The
    budget reaches the samplers as a constraint on each trial (search/searcher.py)."""
    seed, trials = job.search.seed, job.search.trials
    startup = max(2, trials // 3)  # random proposals before the model-based samplers take over
    with warnings.catch_warnings():  # multivariate TPE and PartialFixedSampler are "experimental", for years
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if job.search.sampler == "tpe":
            # group: a parameter proposed only on some branches (the detector space's box loss, with the
            # anchor head) is modelled with the parameters it occurs with, not sampled independently with a
            # warning per trial. A space without branches is one group: multivariate TPE as before.
            sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, group=True)
        elif job.search.sampler == "gp":
            sampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
        elif job.search.sampler == "nsga2":
            # NSGA-II's default population of 50 would leave a search of tens of trials in its first generation.
            sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=min(50, max(4, trials // 4)))
        else:
            sampler = optuna.samplers.RandomSampler(seed=seed)
        if job.search.fixed:
            return optuna.samplers.PartialFixedSampler(job.search.fixed, sampler)
    return sampler


def _enqueued(job: Job, space) -> list[dict] | None:
    """search.enqueue as Optuna's first trials; a parameter the space does not take here (alpha and beta, with a
    pretrained backbone held at its size) is left out."""
    known = space_parameters(space)
    points = [{k: v for k, v in point.items() if k in known}
              for point in enqueued_params(job.search.space, job.search.enqueue, job.search.bounds)]
    return points or None


def _label(entry, index: int) -> str:
    """How a search.enqueue entry is named on its trial's run: as written (rule:1, d0), or by its place."""
    return entry if isinstance(entry, str) else f"enqueue[{index}]"


def _check_fits(job: Job, data: TrainingData, space) -> None:
    """A training split smaller than one global batch trains nothing: say so before Ray starts. Where the space
    searches the batch size, its largest choice must fit."""
    searched = space_parameters(space).get("batch_size")
    if "batch_size" in job.search.fixed:
        batch, key = job.search.fixed["batch_size"], "search.fixed.batch_size"
    elif searched is not None:
        batch, key = max(searched.choices), "the largest of the space's batch_size choices"
    else:
        batch, key = job.train.batch_size, "train.batch_size"
    global_batch = batch * job.resources.workers_per_trial
    if len(data.train) < global_batch:
        raise DataError(f"{data.train.annotation_file}: {len(data.train)} images are fewer than one global batch "
                        f"({key}, {batch}, x resources.workers_per_trial {job.resources.workers_per_trial} = "
                        f"{global_batch})")


def _space(job: Job):
    """The job's search space; with pretrained backbone weights, the backbone is held at their size."""
    space = make_space(job.search.space, job.search.bounds)
    if not job.model.backbone_weights:
        return space
    from trainers.pretrained import read_backbone_weights, standard_backbone_of

    found = standard_backbone_of(read_backbone_weights(job.model.backbone_weights))
    if found is None:
        raise JobError(f"job.model.backbone_weights: {job.model.backbone_weights} holds no standard EfficientNet or "
                       f"EfficientNet-Lite backbone, so the search cannot size its backbone to it")
    _, family, width, depth = found
    return functools.partial(space, backbone=(family, width, depth))


def _optuna_storage(path: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


PARAM_CHARS = 500


def _flat_params(job: Job) -> dict:
    flat = {}
    for section in ("search", "train", "resources"):
        for key, value in asdict(getattr(job, section)).items():
            flat[f"{section}.{key}"] = value
    flat["data.train"] = job.data.train.annotations
    flat["data.val"] = job.data.val.annotations
    flat["data.check"] = job.data.check
    flat["model.backbone_weights"] = job.model.backbone_weights
    # MLflow cuts a param at 6000 characters with a warning; a long enqueue list is cut here, saying so.
    return {key: (text if len(text := str(value)) <= PARAM_CHARS else f"{text[:PARAM_CHARS - 40]}... "
                  f"({len(text)} characters in all)") for key, value in flat.items()}
