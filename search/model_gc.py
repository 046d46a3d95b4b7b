"""`effsearch gc`: delete the logged models of complete runs that are off the frontier and in no registered version."""
from __future__ import annotations

from dataclasses import dataclass

from mlflow.tracking import MlflowClient

from search.frontier import complete_trials, experiment_id_for
from search.tracking import FRONTIER_TAG, MODEL_URI_TAG

MODEL_DELETED_TAG = "effsearch.model_deleted"  # on a run whose model gc deleted: the model it had


@dataclass(frozen=True)
class Collectable:
    run_id: str
    run_name: str
    model_uri: str


def collectable(client: MlflowClient, experiment: str) -> list[Collectable]:
    """Complete runs whose model can go: not on their frontier (the frontier tag, which each search sets over the
    runs it may be compared with), and not the source of any registered model version (production, previous or
    any other)."""
    experiment_id = experiment_id_for(client, experiment)
    registered = {(version.source, version.run_id) for version in client.search_model_versions(max_results=10_000)}
    sources = {source for source, _ in registered} | {run_id for _, run_id in registered}
    found = []
    for point in complete_trials(client, experiment_id):
        tags = client.get_run(point.run_id).data.tags
        uri = tags.get(MODEL_URI_TAG)
        if uri and tags.get(FRONTIER_TAG) == "false" and uri not in sources and point.run_id not in sources:
            found.append(Collectable(point.run_id, point.run_name, uri))
    return found


def delete_models(client: MlflowClient, runs: list[Collectable]) -> None:
    """Delete each run's logged model and its files; the run, its metrics and params stay."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    for run in runs:
        model_id = run.model_uri.removeprefix("models:/")
        model = client.get_logged_model(model_id)
        get_artifact_repository(model.artifact_location).delete_artifacts()
        client.delete_logged_model(model_id)
        client.set_tag(run.run_id, MODEL_DELETED_TAG, run.model_uri)
        client.delete_tag(run.run_id, MODEL_URI_TAG)
