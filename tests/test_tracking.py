"""The MLflow layout of a real search: 8 trials training at once into one SQLite store, and what each run holds."""
import csv
import io

import pytest

from search.frontier import complete_trials
from search.lineage import DATA_HASH_TAG, EPOCHS_TAG
from search.pareto import pareto_front
from search.states import COMPLETE, STATE_TAG
from search.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, OPTUNA_NUMBER_TAG, PARENT_TAG, TRIAL_ID_TAG

TRIALS = 8
EPOCHS = 2


@pytest.fixture(scope="module")
def concurrent(tmp_path_factory):
    """8 real trials (tiny EfficientDet-Lite, 8 images) at once, on a local Ray of 8 logical CPUs."""
    import ray
    from mlflow.tracking import MlflowClient

    from search.job import parse_job
    from search.run import run_search
    from trainers.shapes import make_shapes

    folder = tmp_path_factory.mktemp("concurrent")
    data = make_shapes(folder / "shapes", train_images=8, val_images=4, seed=5)
    raw = {"name": "eight-at-once", "data": {"train": data["train"], "val": data["val"]},
           "search": {"space": "lite_cpu", "trials": TRIALS, "max_concurrent_trials": TRIALS, "seed": 2,
                      "scheduler": "fifo"},
           "train": {"epochs": EPOCHS, "batch_size": 4, "eval_every": 1, "warmup_epochs": 0},
           "resources": {"workers_per_trial": 1, "cpus_per_worker": 1}}
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    said = []
    # Eight 1-CPU trials at once need eight logical CPUs; the machine has two cores, which they share.
    ray.init(num_cpus=TRIALS, include_dashboard=False)
    try:
        outcome = run_search(parse_job(raw), store=folder / "store", say=said.append)
        yield outcome, MlflowClient(uri), said
    finally:
        ray.shutdown()
        patch.undo()


def _children(client, outcome):
    return client.search_runs([outcome.experiment_id], f"tags.`{PARENT_TAG}` = '{outcome.parent_run_id}'")


def test_eight_concurrent_trials_write_every_metric_to_one_sqlite_store(concurrent, capfd):
    outcome, client, said = concurrent
    runs = _children(client, outcome)
    assert outcome.failed == 0 and len(runs) == TRIALS, [r.data.tags.get("effsearch.reason") for r in runs]
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags[STATE_TAG] == COMPLETE
        for key in ("map", "map50", "map75", "loss"):
            history = client.get_metric_history(run.info.run_id, key)
            assert [m.step for m in history] == list(range(1, EPOCHS + 1)), (run.info.run_name, key)
        assert {"gflops", "params_m", "latency_ms"} <= set(run.data.metrics)
    assert not any("locked" in line.lower() for line in said)
    console = capfd.readouterr()
    assert "database is locked" not in console.out + console.err


def test_each_trial_run_holds_its_spec_searched_values_and_tags(concurrent):
    outcome, client, _ = concurrent
    experiment = client.get_experiment(outcome.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    parent = client.get_run(outcome.parent_run_id)
    for run in _children(client, outcome):
        params, tags = run.data.params, run.data.tags
        assert {"num_classes", "image_size", "fpn_channels", "fusion", "train.lr"} <= set(params)
        assert any(key.startswith("search.") for key in params)
        assert tags[OPTUNA_NUMBER_TAG].isdigit() and tags[TRIAL_ID_TAG]
        assert run.info.run_name.startswith(f"t{int(tags[OPTUNA_NUMBER_TAG]):03d}-")
        assert (tags[DATA_HASH_TAG], tags[EPOCHS_TAG]) == (parent.data.tags[DATA_HASH_TAG], str(EPOCHS))


def test_the_parents_frontier_csv_is_the_pareto_front_of_its_complete_runs(concurrent, tmp_path):
    import mlflow

    outcome, client, _ = concurrent
    path = mlflow.artifacts.download_artifacts(run_id=outcome.parent_run_id, artifact_path="frontier.csv",
                                               dst_path=str(tmp_path))
    rows = list(csv.DictReader(io.StringIO(open(path).read())))
    assert len(rows) == TRIALS
    complete = complete_trials(client, outcome.experiment_id)
    expected = {complete[i].run_id for i in pareto_front([(p.map, p.gflops) for p in complete])}
    assert {row["run_id"] for row in rows if row["frontier"] == "true"} == expected
    assert {row["state"] for row in rows} == {COMPLETE}
    png = mlflow.artifacts.download_artifacts(run_id=outcome.parent_run_id, artifact_path="frontier.png",
                                              dst_path=str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    page = open(mlflow.artifacts.download_artifacts(run_id=outcome.parent_run_id, artifact_path="frontier.html",
                                                    dst_path=str(tmp_path))).read()
    assert "plotly_click" in page and all(row["run_name"] in page for row in rows)
