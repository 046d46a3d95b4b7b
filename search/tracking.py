"""MLflow: where the store lives, the experiment of a job, and a Tune callback that records each trial."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from ray.tune import Callback

DEFAULT_STORE = Path(".effsearch")
TRIAL_ID_TAG = "effsearch.trial_id"
FULL_BUDGET_TAG = "effsearch.full_budget"  # "true" only when the trial ran every epoch it was given
FRONTIER_TAG = "frontier"
PARENT_TAG = "mlflow.parentRunId"
MODEL_URI_TAG = "effsearch.model_uri"  # the logged model (models:/m-...) that promotion registers
# Per-epoch metrics worth a curve in the UI.
EPOCH_METRICS = ("map", "map50", "map75", "map_small", "map_medium", "map_large", "loss", "lr",
                 "epoch_s", "images_per_s", "gflops", "params_m", "latency_ms", "world_size", "train_images",
                 "shard_overlap", "eval_images", "dropped_boxes", "peak_memory_mb", "map_raw", "map_ema",
                 "resumed_from_epoch")
MODEL_PIP_REQUIREMENTS = ["torch==2.14.1", "effdet==0.4.1"]


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else an SQLite store under ./.effsearch."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    DEFAULT_STORE.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(DEFAULT_STORE / 'mlflow.db').resolve()}"


def artifact_location(uri: str, experiment_name: str) -> str | None:
    # With sqlite, MLflow puts artifacts under ./mlruns of whatever folder you ran from; keep them beside the DB.
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):])
    return (db.parent / "artifacts" / experiment_name).resolve().as_uri()


def ensure_experiment(client: MlflowClient, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri, name))


class MlflowTrialLogger(Callback):
    """Writes every trial as a child run of the search's parent run; the Tune driver is the only writer."""

    def __init__(self, client: MlflowClient, experiment_id: str, parent_run_id: str, total_epochs: int):
        self.client = client
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.total_epochs = total_epochs
        self.run_ids: dict[str, str] = {}

    def _run_for(self, trial) -> str:
        if trial.trial_id not in self.run_ids:
            run = self.client.create_run(
                self.experiment_id, run_name=f"trial-{trial.trial_id}",
                tags={PARENT_TAG: self.parent_run_id, TRIAL_ID_TAG: trial.trial_id})
            spec = trial.config.get("spec", {})
            for key, value in spec.items():
                self.client.log_param(run.info.run_id, key, value)
            self.run_ids[trial.trial_id] = run.info.run_id
        return self.run_ids[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._run_for(trial)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        now = int(time.time() * 1000)
        metrics = [mlflow.entities.Metric(k, float(result[k]), now, step) for k in EPOCH_METRICS if k in result]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        result = trial.last_result or {}
        full = int(result.get("epoch", 0)) >= self.total_epochs and result.get("full_budget") == 1
        self.client.set_tag(run_id, FULL_BUDGET_TAG, "true" if full else "false")
        if result.get("latency_device"):
            self.client.set_tag(run_id, "effsearch.latency_device", str(result["latency_device"]))
        checkpoint_path = result.get("checkpoint_path")
        if full and checkpoint_path:
            try:
                log_model(run_id, checkpoint_path)
            except Exception as err:  # the metrics are recorded; a model that fails to log must not lose them
                self.client.set_tag(run_id, FULL_BUDGET_TAG, "false")
                self.client.set_tag(run_id, "effsearch.error", f"logging the model failed: {err}"[:4000])
        self.client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        self.client.set_tag(run_id, FULL_BUDGET_TAG, "false")
        reason = _error_summary(trial)
        if reason:
            self.client.set_tag(run_id, "effsearch.error", reason[:4000])
        self.client.set_terminated(run_id, "FAILED")


def _error_summary(trial) -> str:
    path = getattr(trial, "error_file", None)
    if path and Path(path).exists():
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
        return lines[-1] if lines else ""
    return ""


def log_model(run_id: str, checkpoint_dir: str) -> None:
    """Log the trained network as an MLflow pt2 model (torch.export: loading it runs no pickled code).

    The raw EfficientDet exports; effdet's NMS does not, so the spec travels beside the graph as spec.json
    and prediction rebuilds anchors and post-processing from it.
    """
    import mlflow.pytorch
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from trainers.checkpoint import SPEC_FILE, load_model

    model, spec = load_model(checkpoint_dir)
    shape = (3, spec.image_size, spec.image_size)
    # A batch of 2 in the example makes torch.export keep the batch dimension dynamic.
    example = np.zeros((2, *shape), dtype=np.float32)
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *shape))]))
    # MLflow tries to serve-validate the example and warns that a tuple-of-lists output is not one tensor.
    quiet = logging.getLogger("mlflow")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(
                model, name="model", signature=signature, input_example=example,
                pip_requirements=MODEL_PIP_REQUIREMENTS, extra_files=[str(Path(checkpoint_dir) / SPEC_FILE)])
    finally:
        quiet.setLevel(level)
    MlflowClient().set_tag(run_id, MODEL_URI_TAG, info.model_uri)
