"""The MLflow layout of a real search: 8 trials training at once into one SQLite store, and what each run holds."""
import csv
import io

import pytest

from search.frontier import complete_trials
from search.lineage import DATA_HASH_TAG, EPOCHS_TAG
from search.pareto import pareto_front
from search.states import COMPLETE, STATE_TAG
from search.logged_model import MLMODEL, MODEL_FOLDER
from search.tracking import (EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, MODEL_URI_TAG, OPTUNA_NUMBER_TAG, PARENT_TAG,
                             TRIAL_ID_TAG)
from conftest import empty_mlflow_store

TRIALS = 8
EPOCHS = 2


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 8 logical CPUs for the module's searches, each of which joins it: eight 1-CPU trials at once
    need eight; the machine has two cores, which they share."""
    import ray

    ray.init(num_cpus=TRIALS, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def concurrent(tmp_path_factory, local_ray):
    """8 real trials (tiny EfficientDet-Lite, one batch of 4 images, 2 to score) at once, on the module's Ray."""
    from mlflow.tracking import MlflowClient

    from search.job import parse_job
    from search.run import run_search
    from trainers.shapes import make_shapes

    folder = tmp_path_factory.mktemp("concurrent")
    data = make_shapes(folder / "shapes", train_images=4, val_images=2, seed=5)
    raw = {"name": "eight-at-once", "data": {"train": data["train"], "val": data["val"]},
           "search": {"space": "lite_cpu", "trials": TRIALS, "max_concurrent_trials": TRIALS, "seed": 2,
                      "scheduler": "fifo"},
           "train": {"epochs": EPOCHS, "batch_size": 4, "eval_every": 1, "warmup_epochs": 0},
           "resources": {"workers_per_trial": 1, "cpus_per_worker": 1}}
    uri = empty_mlflow_store(folder)
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    said = []
    try:
        outcome = run_search(parse_job(raw), store=folder / "store", say=said.append)
        yield outcome, MlflowClient(uri), said, folder / "store"
    finally:
        patch.undo()


def _children(client, outcome):
    return client.search_runs([outcome.experiment_id], f"tags.`{PARENT_TAG}` = '{outcome.parent_run_id}'")


def test_eight_concurrent_trials_write_every_metric_to_one_sqlite_store(concurrent):
    """Every epoch of every trial lands (a write that failed on a locked store would have raised out of the search
    or left a gap), and the trials did train at once: at least half of the runs were open at one instant."""
    outcome, client, said, _ = concurrent
    runs = _children(client, outcome)
    assert outcome.failed == 0 and len(runs) == TRIALS, [r.data.tags.get("effsearch.reason") for r in runs]
    spans = []
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags[STATE_TAG] == COMPLETE
        for key in ("map", "map50", "map75", "loss"):
            history = client.get_metric_history(run.info.run_id, key)
            assert [m.step for m in history] == list(range(1, EPOCHS + 1)), (run.info.run_name, key)
        assert {"gflops", "params_m", "latency_ms"} <= set(run.data.metrics)
        spans.append((run.info.start_time, run.info.end_time))  # its trial's start to its end, in ms
    at_once = max(sum(first <= start <= last for first, last in spans) for start, _ in spans)
    assert at_once >= TRIALS // 2, sorted(spans)
    assert not any("locked" in line.lower() for line in said)


def test_each_trial_run_holds_its_spec_searched_values_and_tags(concurrent):
    outcome, client, *_ = concurrent
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

    outcome, client, *_ = concurrent
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


def test_each_trial_saved_its_model_in_its_last_checkpoint_and_the_driver_logged_those_files(concurrent):
    """The trials export their models, on their own cores, into their last checkpoints; the driver uploads those
    folders as they are (search/logged_model.py): each run's logged model holds its trial's files, byte for byte,
    and no JSON copy of the input example."""
    import filecmp
    from pathlib import Path

    outcome, client, _, store = concurrent
    saved = list(store.rglob(f"{MODEL_FOLDER}/{MLMODEL}"))
    assert len(saved) == TRIALS  # one a trial: only in the last of its checkpoints
    for run in _children(client, outcome):
        (mlmodel,) = [path for path in saved if run.data.tags[TRIAL_ID_TAG] in str(path)]
        in_trial = mlmodel.parent
        model = client.get_logged_model(run.data.tags[MODEL_URI_TAG].removeprefix("models:/"))
        logged = Path(model.artifact_location.removeprefix("file://"))
        files = sorted(str(p.relative_to(logged)) for p in logged.rglob("*") if p.is_file())
        assert files == sorted(str(p.relative_to(in_trial)) for p in in_trial.rglob("*") if p.is_file())
        assert "data/model.pt2" in files and not any("input_example" in name for name in files), files
        for name in files:
            if name != MLMODEL:  # the logged one adds the run's and the model's ids
                assert filecmp.cmp(logged / name, in_trial / name, shallow=False), name


def _instant(config, *, setup):
    """Stands in for training: reports every epoch of the job at once, with the proposal's real GFLOPs."""
    from ray import tune

    from search.searcher import CostCounter

    cost = CostCounter(setup.data.train.num_classes)(config["spec"])
    epochs = setup.job.train.epochs
    tune.report({"epoch": epochs, "loss": 1.0, "map": 0.2 + cost.gflops * epochs, "gflops": cost.gflops,
                 "params_m": cost.params_m, "full_budget": 1})


def test_only_trials_of_the_same_data_and_epoch_budget_are_compared(tmp_path, shapes, monkeypatch, capsys,
                                                                     local_ray):
    """Three searches of one job: 1 epoch, 2 epochs, 1 epoch again. Each parent's frontier.csv holds its own
    trials; the experiment-wide frontier compares the latest search's data and epochs only, and says so; a search
    of another budget leaves the earlier runs' frontier tags alone."""
    import sys

    import mlflow
    import ray
    from mlflow.tracking import MlflowClient

    from search.cli import main
    from search.frontier import experiment_frontier
    from search.job import parse_job
    from search.run import run_search
    from search.tracking import FRONTIER_TAG

    uri = empty_mlflow_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this module
    outcomes = []  # the three searches join the module's Ray (fixture local_ray)
    try:
        for epochs, seed in ((1, 0), (2, 1), (1, 2)):
            raw = {"name": "budgets", "data": {"train": shapes["train"], "val": shapes["val"]},
                   "search": {"space": "lite_cpu", "trials": 1, "seed": seed, "scheduler": "fifo"},
                   "train": {"epochs": epochs}, "resources": {"cpus_per_worker": 1}}
            outcomes.append(run_search(parse_job(raw), store=tmp_path / "store", say=lambda _: None,
                                       trainable=_instant))
            if len(outcomes) == 1:
                first_tags = {p.run_id: client.get_run(p.run_id).data.tags[FRONTIER_TAG]
                              for p in experiment_frontier(client, outcomes[0].experiment_id).compared}
            if len(outcomes) == 2:
                found = experiment_frontier(client, outcomes[1].experiment_id)
                assert {p.parent_run_id for p in found.compared} == {outcomes[1].parent_run_id}
                assert found.left_out == 1 and found.among.epochs == 2
                # The 2-epoch search did not re-tag the 1-epoch runs.
                assert {run_id: client.get_run(run_id).data.tags[FRONTIER_TAG] for run_id in first_tags} == first_tags
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    experiment_id = outcomes[0].experiment_id
    for outcome in outcomes:
        path = mlflow.artifacts.download_artifacts(run_id=outcome.parent_run_id, artifact_path="frontier.csv",
                                                   dst_path=str(tmp_path / outcome.parent_run_id))
        listed = {row["run_id"] for row in csv.DictReader(open(path))}
        children = {r.info.run_id for r in client.search_runs(
            [experiment_id], f"tags.`{PARENT_TAG}` = '{outcome.parent_run_id}'")}
        assert listed == children and len(children) == 1
    found = experiment_frontier(client, experiment_id)
    assert {p.parent_run_id for p in found.compared} == {outcomes[0].parent_run_id, outcomes[2].parent_run_id}
    assert found.searches == 2 and found.left_out == 1 and found.among.epochs == 1
    capsys.readouterr()
    assert main(["frontier", "budgets"]) == 0
    said = capsys.readouterr().out.splitlines()[0]
    assert said == (f"budgets: compared 2 complete runs of 2 searches (data {found.among.data_hash}, 1 epoch); "
                    "1 complete run of other data or epoch budgets is not compared"), said


def _crashes_once_after_an_unsaved_epoch(config, *, setup):
    """Epoch 1 with a checkpoint, epoch 2 without one, then a crash; Tune's retry resumes from epoch 1 and
    reports epochs 2 and 3, so epoch 2 is reported twice (its loss differs, to tell the attempts apart)."""
    import tempfile
    from pathlib import Path

    from ray import tune

    retried = tune.get_checkpoint() is not None
    for epoch in range(2 if retried else 1, 4):
        metrics = {"epoch": epoch, "loss": epoch + (0.5 if retried else 0.0), "epoch_s": 1.0, "gflops": 0.05}
        if epoch == 1:
            with tempfile.TemporaryDirectory() as folder:
                (Path(folder) / "epoch").write_text("1")
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        else:
            tune.report(metrics)
        if epoch == 2 and not retried:
            raise RuntimeError("the worker was lost")


def test_an_epoch_reported_again_after_a_restart_is_recorded_once(tmp_path, shapes, monkeypatch, capsys, local_ray):
    """A trial restarted from an earlier checkpoint reports some epochs again: each epoch stays one point of the
    run's curves, the first attempt's. The console says it restarted, rather than "started" twice."""
    import sys

    import ray
    from mlflow.tracking import MlflowClient

    from search.job import parse_job
    from search.run import run_search

    uri = empty_mlflow_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    raw = {"name": "restarted", "data": {"train": shapes["train"], "val": shapes["val"]},
           "search": {"space": "lite_cpu", "trials": 1, "scheduler": "fifo"}, "train": {"epochs": 3},
           "resources": {"cpus_per_worker": 1, "max_failures": 1}}
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this module
    try:
        outcome = run_search(parse_job(raw), store=tmp_path / "store", say=lambda _: None,
                             trainable=_crashes_once_after_an_unsaved_epoch)
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    client = MlflowClient(uri)
    (run,) = client.search_runs([outcome.experiment_id], f"tags.`{PARENT_TAG}` = '{outcome.parent_run_id}'")
    history = client.get_metric_history(run.info.run_id, "loss")
    assert outcome.failed == 0
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 2.0), (3, 3.5)]
    out = capsys.readouterr().out
    assert out.count("trial 1/1 started: ") == 1 and out.count("trial 1/1 restarted from its last checkpoint: ") == 1
