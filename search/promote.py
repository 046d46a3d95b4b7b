"""Promotion: register the best frontier model under a FLOPs budget and point the `production` alias at it."""
from __future__ import annotations

from dataclasses import dataclass

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from search.frontier import FrontierError, compute_frontier, experiment_id_for, finished_trials
from search.tracking import MODEL_URI_TAG

PRODUCTION, PREVIOUS = "production", "previous"


@dataclass(frozen=True)
class Promotion:
    model_name: str
    version: str
    run_id: str
    map: float
    gflops: float
    previous_version: str | None

    @property
    def uri(self) -> str:
        return f"models:/{self.model_name}@{PRODUCTION}"


def promote(client: MlflowClient, experiment: str, max_gflops: float | None, model_name: str | None = None) -> Promotion:
    """Highest-AP frontier run within max_gflops -> new model version, alias production; old one -> previous."""
    experiment_id = experiment_id_for(client, experiment)
    front = compute_frontier(finished_trials(client, experiment_id))
    eligible = [p for p in front if max_gflops is None or p.gflops <= max_gflops]
    if not eligible:
        cheapest = min((p.gflops for p in front), default=None)
        hint = f"; the cheapest frontier model needs {cheapest:.3f} GFLOPs" if cheapest is not None else ""
        raise FrontierError(f"no finished trial of {experiment!r} fits within {max_gflops} GFLOPs{hint}")
    best = max(eligible, key=lambda p: (p.map, -p.gflops))
    name = model_name or experiment
    previous = _current_version(client, name)
    model_uri = client.get_run(best.run_id).data.tags.get(MODEL_URI_TAG)
    if not model_uri:
        raise FrontierError(f"run {best.run_id} has no logged model to promote (tag {MODEL_URI_TAG} is missing)")
    version = str(mlflow.register_model(model_uri, name).version)
    if previous is not None and previous != version:
        client.set_registered_model_alias(name, PREVIOUS, previous)
    client.set_registered_model_alias(name, PRODUCTION, version)
    client.set_model_version_tag(name, version, "gflops", f"{best.gflops:.4f}")
    client.set_model_version_tag(name, version, "map", f"{best.map:.4f}")
    return Promotion(name, version, best.run_id, best.map, best.gflops, previous)


def _current_version(client: MlflowClient, name: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, PRODUCTION).version)
    except MlflowException:
        return None
