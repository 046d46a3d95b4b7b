"""MLflow: where the store lives, the experiment of a job, the tags effsearch reads back, and closing runs."""
from __future__ import annotations

import os
from pathlib import Path

from mlflow.tracking import MlflowClient

from search.states import FAILED, STATE_TAG

# The driver's own folder: the Optuna journal, the records --resume reads, and (unless the job names a storage_path
# and MLFLOW_TRACKING_URI is set) the trials' checkpoints and the SQLite tracking store. A submitted job sets it to
# a folder on the head that outlives the job (search/cluster.py).
STORE_VARIABLE = "EFFSEARCH_STORE"
DEFAULT_STORE = Path(os.environ.get(STORE_VARIABLE) or ".effsearch").expanduser()
TRIAL_ID_TAG = "effsearch.trial_id"
OPTUNA_NUMBER_TAG = "effsearch.optuna_number"  # the Optuna trial number of a trial's run
FULL_BUDGET_TAG = "effsearch.full_budget"  # "true" only when the trial ran every epoch it was given
FRONTIER_TAG = "frontier"
PARENT_TAG = "mlflow.parentRunId"
MODEL_URI_TAG = "effsearch.model_uri"  # the logged model (models:/m-...) that promotion registers
ERROR_TAG = "effsearch.error"  # a failed trial: its error's last line
REASON_TAG = "effsearch.reason"  # a trial that did not complete (failed, pruned, infeasible): why, in one line
ENQUEUED_TAG = "effsearch.enqueued"  # a trial that is one of search.enqueue's points: its entry (rule:1, d0)
WARM_START_TAG = "effsearch.warm_start"  # on a parent run: the job whose complete trials seeded its study


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


# What the experiment is, for MLflow: model training, not GenAI. MLflow 3.17.2's and 3.18.0's UIs do not read it yet
# (their builds pick the view from the URL's workflowType, else the browser's last choice, else GenAI: seen in
# tests/test_browser.py), so the links effsearch prints carry UI_TRAINING_VIEW too.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
UI_TRAINING_VIEW = "workflowType=machine_learning"


def ui_url(base: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """A link into the MLflow UI at base ('' for the server's own root) that opens on the training runs view:
    the experiment list, an experiment's runs, or one run."""
    route = "/experiments" + (f"/{experiment_id}" if experiment_id else "") + (f"/runs/{run_id}" if run_id else "")
    return f"{base.rstrip('/')}/#{route}?{UI_TRAINING_VIEW}"


def ensure_experiment(client: MlflowClient, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is None:
        return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri, name),
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    if found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # an experiment made before the tag, or by hand
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return found.experiment_id


def close_open_runs(client: MlflowClient, experiment_id: str, parent_run_id: str, status: str) -> int:
    """End every child run of the search still RUNNING (an interrupted or crashed search) as `status`, with the
    reason a person reads in the UI."""
    open_runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'",
        max_results=10_000)
    reason = ("the search was stopped (Ctrl-C or SIGTERM) while it trained; --resume continues it"
              if status == "KILLED" else "the search ended with an error while it trained")
    for run in open_runs:
        client.set_tag(run.info.run_id, STATE_TAG, FAILED)  # it did not finish, whatever stopped it
        client.set_tag(run.info.run_id, REASON_TAG, reason)
        client.set_terminated(run.info.run_id, status)
    return len(open_runs)
