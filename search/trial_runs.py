"""A Tune callback that writes every trial as an MLflow child run of the search; the driver is the only writer."""
from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Callable

import mlflow
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from search.frontier import record_frontier
from search.lineage import Comparable
from search.logged_model import log_model
from search.states import COMPLETE, FAILED, FULL_BUDGET_KEY, INFEASIBLE, PRUNED, STATE_TAG
from search.trainable import CHECKPOINT_PATH_KEY
from search.tracking import (ENQUEUED_TAG, ERROR_TAG, FULL_BUDGET_TAG, OPTUNA_NUMBER_TAG, PARENT_TAG, REASON_TAG,
                             TRIAL_ID_TAG)
from trainers.spec import ModelSpec

# Per-epoch metrics worth a curve in the UI. Accuracy keys arrive only in epochs that were evaluated.
EPOCH_METRICS = ("map", "map50", "map75", "map_small", "map_medium", "map_large", "loss", "lr",
                 "epoch_s", "eval_s", "images_per_s", "gflops", "params_m", "latency_ms", "world_size", "train_images",
                 "shard_overlap", "eval_images", "dropped_boxes", "peak_memory_mb", "map_raw", "map_ema",
                 "resumed_from_epoch", "image_cache")
# The frontier's artifacts are redrawn as trials complete, at most this often (a drawing takes about a second,
# on the driver's event loop); the search draws them once more when it ends.
FRONTIER_REFRESH_S = 10.0


class MlflowTrialLogger(Callback):
    """Writes every trial as a child run of the search's parent run; the Tune driver is the only writer."""

    def __init__(self, client: MlflowClient, experiment_id: str, parent_run_id: str, total_epochs: int,
                 max_gflops: float | None = None, number_of: Callable[[str], int | None] = lambda _: None,
                 comparable: Comparable | None = None, enqueued_of: Callable[[str], str | None] = lambda _: None,
                 num_classes: int | None = None, train_settings: dict | None = None):
        self.client = client
        self.num_classes = num_classes  # the data's: with it, a run's params are the full ModelSpec
        self.train_settings = train_settings or {}  # the job's; a searched setting overrides its own
        self.number_of = number_of  # Tune trial id -> its Optuna trial number (the searcher knows it)
        self.enqueued_of = enqueued_of  # Tune trial id -> the search.enqueue entry it is, if any
        self.comparable = comparable
        self._drawn_at = 0.0
        self.max_gflops = max_gflops
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.total_epochs = total_epochs
        self.run_ids: dict[str, str] = {}  # Tune trial id -> its run
        self.last_epochs: dict[str, int] = {}  # run -> the last epoch whose metrics it holds
        self._read = False

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks with the experiment, and a resumed search (--resume) unpickles this logger
        # from then: it must read the runs again, or every trial recorded since would get a second run.
        return {**self.__dict__, "run_ids": {}, "last_epochs": {}, "_read": False}

    def _read_runs(self) -> None:
        """The runs this search has recorded, read once (not queried at every trial start): a trial recorded
        before a resume keeps its run."""
        self.run_ids.update({run.data.tags[TRIAL_ID_TAG]: run.info.run_id
                             for run in self._children() if TRIAL_ID_TAG in run.data.tags})
        self._read = True

    def _children(self):
        token = None
        while True:
            page = self.client.search_runs([self.experiment_id], f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'",
                                           max_results=1000, page_token=token)
            yield from page
            token = page.token
            if not token:
                return

    def _run_for(self, trial) -> str:
        if not self._read:
            self._read_runs()
        if trial.trial_id not in self.run_ids:
            number = self.number_of(trial.trial_id)
            tags = {**self._common_tags(number), TRIAL_ID_TAG: trial.trial_id}
            enqueued = self.enqueued_of(trial.trial_id)
            if enqueued:
                tags[ENQUEUED_TAG] = enqueued
            run = self.client.create_run(self.experiment_id, run_name=run_name(number, trial.trial_id, trial.config),
                                         tags=tags)
            self.client.log_batch(run.info.run_id, params=self._params(trial.config))
            self.run_ids[trial.trial_id] = run.info.run_id
            self.last_epochs[run.info.run_id] = 0
        return self.run_ids[trial.trial_id]

    def _last_epoch(self, run_id: str) -> int:
        """The last epoch the run holds metrics for; read from MLflow once for a run recorded before a resume."""
        if run_id not in self.last_epochs:
            self.last_epochs[run_id] = max((m.step for m in self.client.get_metric_history(run_id, "epoch_s")),
                                           default=0)
        return self.last_epochs[run_id]

    def _params(self, config: dict) -> list[mlflow.entities.Param]:
        return [mlflow.entities.Param(key, str(value))
                for key, value in trial_params(config, self.num_classes, self.train_settings).items()]

    def _common_tags(self, number: int | None) -> dict[str, str]:
        tags = {PARENT_TAG: self.parent_run_id, **(self.comparable.tags() if self.comparable else {})}
        if number is not None:
            tags[OPTUNA_NUMBER_TAG] = str(number)
        return tags

    def record_infeasible(self, number: int, config: dict, gflops: float | None, params_m: float,
                          reason: str) -> None:
        """A proposal over the budget: never a Ray trial, but a run the UI lists, with its cost and why."""
        tags = {**self._common_tags(number), STATE_TAG: INFEASIBLE, REASON_TAG: reason[:4000],
                FULL_BUDGET_TAG: "false"}
        run = self.client.create_run(self.experiment_id, run_name=run_name(number, "infeasible", config), tags=tags)
        now = int(time.time() * 1000)
        metrics = [mlflow.entities.Metric("params_m", float(params_m), now, 0)]
        if gflops is not None:
            metrics.append(mlflow.entities.Metric("gflops", float(gflops), now, 0))
        self.client.log_batch(run.info.run_id, metrics=metrics, params=self._params(config))
        self.client.set_terminated(run.info.run_id, "FINISHED")

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._run_for(trial)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        # A trial restarted from its last checkpoint (a retry, or a --resume after the driver died between an
        # epoch's report and Tune's next snapshot) reports the epochs after that checkpoint again. The loop's
        # epochs are seeded (trainers/loop.py), so a repeat measures what the run holds; a second point at the
        # same step would only draw the curve back on itself.
        if step <= self._last_epoch(run_id):
            return
        now = int(time.time() * 1000)
        metrics = [mlflow.entities.Metric(k, float(result[k]), now, step) for k in EPOCH_METRICS if k in result]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)
        self.last_epochs[run_id] = step

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        tags = self.client.get_run(run_id).data.tags
        if tags.get(STATE_TAG) == COMPLETE:
            return  # recorded complete before the driver died; a resumed Tune may end it again
        result = trial.last_result or {}
        full = int(result.get("epoch", 0)) >= self.total_epochs and result.get(FULL_BUDGET_KEY) == 1
        self.client.set_tag(run_id, FULL_BUDGET_TAG, "true" if full else "false")
        if result.get("latency_device"):
            self.client.set_tag(run_id, "effsearch.latency_device", str(result["latency_device"]))
        # A TorchTrainer's trial forwards its checkpoint's path; a one-worker trial reported it to Tune.
        checkpoint_path = result.get(CHECKPOINT_PATH_KEY) or (trial.checkpoint.path if trial.checkpoint else None)
        state = COMPLETE if full else PRUNED  # a trial that returned before its last epoch was stopped early
        if not full:
            self.client.set_tag(run_id, REASON_TAG, f"stopped by the scheduler after epoch {int(result.get('epoch', 0))}"
                                                    f" of {self.total_epochs}")
        if full and checkpoint_path:
            try:
                log_model(run_id, checkpoint_path)
            except Exception as err:  # the metrics are recorded; a model that fails to log must not lose them
                self.client.set_tag(run_id, FULL_BUDGET_TAG, "false")
                reason = f"logging the model failed: {err}".splitlines()[0][:4000]
                self.client.set_tag(run_id, ERROR_TAG, reason)
                self.client.set_tag(run_id, REASON_TAG, reason)
                state = FAILED
        if state == COMPLETE and REASON_TAG in tags:
            # Left by an interrupted search ("--resume continues it"); the resumed trial has now completed.
            self.client.delete_tag(run_id, REASON_TAG)
        self.client.set_tag(run_id, STATE_TAG, state)
        self.client.set_terminated(run_id, "FINISHED")
        if state == COMPLETE and time.monotonic() - self._drawn_at >= FRONTIER_REFRESH_S:
            # The frontier, its artifacts and hypervolume, as trials join it.
            record_frontier(self.client, self.experiment_id, self.parent_run_id, self.comparable, self.max_gflops)
            self._drawn_at = time.monotonic()

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        self.client.set_tag(run_id, FULL_BUDGET_TAG, "false")
        reason = error_summary(trial)
        if reason:
            self.client.set_tag(run_id, ERROR_TAG, reason[:4000])
            self.client.set_tag(run_id, REASON_TAG, reason[:4000])
        path = getattr(trial, "error_file", None)
        if path and Path(path).is_file():
            try:  # the whole traceback, beside the run; the console has only its one line
                self.client.log_artifact(run_id, path)
            except Exception:  # noqa: BLE001 - the run's state and reason matter more than its traceback
                pass
        self.client.set_tag(run_id, STATE_TAG, FAILED)
        self.client.set_terminated(run_id, "FAILED")


def error_summary(trial) -> str:
    """The one line of a failed trial's error a person needs (error_line)."""
    path = getattr(trial, "error_file", None)
    return error_line(Path(path).read_text()) if path and Path(path).exists() else ""


# A line that begins an exception, "RuntimeError: ..." or "trainers.loop.OutOfMemory: ...", at the line's start.
_EXCEPTION_START = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Z]\w*: \S")


def error_line(text: str) -> str:
    """The line of an error's text that says what went wrong: the last that begins an exception (a multi-worker
    trial's error quotes its worker's after Train's own), else the last line. A message can go on over several
    lines, and its last (torch's DDP error ends "In addition, you can set the environment variable ...") is not
    the one that says what happened."""
    lines = [line for line in text.splitlines() if line.strip()]
    starts = [line for line in lines if _EXCEPTION_START.match(line)]
    return (starts or lines or [""])[-1]


def trial_params(config: dict, num_classes: int | None = None, train_settings: dict | None = None) -> dict:
    """A trial's MLflow params: the full model spec's fields by name (with the data's num_classes, and every
    default the space left unset), its training settings as train.KEY (the job's, and those the space searched
    in their place), and the sampler's own values (phi, alpha, ...) as search.KEY, so that the UI compares runs
    by the knobs that were searched. One batch, not a write per parameter: Tune logs them before the trial
    starts, and at 128 trials at once the per-parameter writes held the first wave back a minute
    (benchmarks/scale_sim.py)."""
    spec = config.get("spec", {})
    if num_classes is not None and spec:
        spec = ModelSpec.from_dict({**spec, "num_classes": num_classes}, where="trial spec").to_dict()
    searched = {k: v for k, v in config.items() if k not in ("spec", "train") and not isinstance(v, dict)}
    train = {**(train_settings or {}), **config.get("train", {})}
    return {**spec, **{f"train.{k}": v for k, v in train.items()},
            **{f"search.{k}": v for k, v in searched.items()}}


DETECTOR_PARTS = ("head", "neck", "box_loss", "assigner")
DETECTOR_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelSpec) if f.name in DETECTOR_PARTS}


def run_name(number: int | None, trial_id: str, config: dict) -> str:
    """A name to read in the UI's run list: the trial's Optuna number (else its Tune id: after --resume, Tune
    unpickles this logger with the searcher as it was at the start, which knows no newer trial), phi where the
    space has one, and the network's size (input, backbone width and depth, BiFPN width x repeats), e.g.
    t007-phi0.5-r384-w0.80d0.90-f88x4, and the detector parts that are not EfficientDet's own (-center, -pan-giou)."""
    spec = config.get("spec", {})
    parts = [f"t{number:03d}" if number is not None else trial_id]
    if "phi" in config:
        parts.append(f"phi{config['phi']:g}")
    if spec:
        parts.append(f"r{spec.get('image_size')}-w{float(spec.get('backbone_width', 0)):.2f}"
                     f"d{float(spec.get('backbone_depth', 0)):.2f}-f{spec.get('fpn_channels')}x{spec.get('fpn_repeats')}")
    parts.extend(str(spec[key]) for key in DETECTOR_PARTS if key in spec and spec[key] != DETECTOR_DEFAULTS[key])
    return "-".join(parts)
