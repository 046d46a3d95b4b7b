"""Promotion, rollback, refusals, lineage and gc, on the runs of a real search (local Ray, SQLite MLflow)."""
import hashlib
import json
import math
import sys

import pytest

from search.cli import main
from search.frontier import complete_trials, compute_frontier
from search.job import parse_job
from search.promote import PREVIOUS, PRODUCTION, PromotionRefused, promote, rollback
from search.states import COMPLETE, FAILED, INFEASIBLE, PRUNED, STATE_TAG
from search.tracking import FRONTIER_TAG, MODEL_URI_TAG, PARENT_TAG
from conftest import empty_mlflow_store

NAME = "promote-test"
# With seed 1 the sampler's first proposal is over this budget (tests/test_search.py): an infeasible run.
BUDGET = 0.06
# What the n-th trial to start (one at a time) does. "dominated" and "no_model" report inflated GFLOPs and a low
# AP, so that they are off the frontier whatever the sampler proposed.
STAGES = ["complete", "complete", PRUNED, FAILED, "no_model", "dominated", "dominated", "complete"]


def _staged_trial(config, *, setup):
    """Stands in for training: ends as STAGES says for its place in the start order; a complete one saves an
    untrained network as its checkpoint, so that its model is logged, registered and loaded for real."""
    import os
    import tempfile
    from pathlib import Path

    from ray import tune

    from search.searcher import CostCounter
    from search.trainable import CHECKPOINT_PATH_KEY
    from trainers.checkpoint import save_checkpoint
    from trainers.model import build_model
    from trainers.spec import ModelSpec

    counter = Path(setup.storage_path) / "started"
    counter.mkdir(parents=True, exist_ok=True)
    place = 0
    while True:  # the first free place in the start order (trials start one at a time)
        try:
            os.close(os.open(counter / str(place), os.O_CREAT | os.O_EXCL))
            break
        except FileExistsError:
            place += 1
    stage = STAGES[place] if place < len(STAGES) else "complete"
    num_classes = setup.data.train.num_classes
    cost = CostCounter(num_classes)(config["spec"])
    if stage == FAILED:
        raise RuntimeError("stand-in failure: out of memory")
    gflops, ap = cost.gflops, 0.2 + 2 * cost.gflops
    if stage in ("dominated", "no_model"):
        gflops, ap = gflops + 10, 0.01
    report = {"epoch": 1 if stage == PRUNED else 2, "map": ap, "map50": ap, "gflops": gflops,
              "params_m": cost.params_m, "full_budget": 0 if stage == PRUNED else 1}
    if stage in ("complete", "dominated"):
        folder = tempfile.mkdtemp(dir=setup.storage_path)
        spec = ModelSpec.from_dict({**config["spec"], "num_classes": num_classes}, where="stand-in")
        save_checkpoint(folder, spec=spec, model=build_model(spec), ema_model=None, deploy="raw", state={"epoch": 2})
        report[CHECKPOINT_PATH_KEY] = folder
    tune.report(report)


@pytest.fixture(scope="module")
def store(tmp_path_factory, shapes):
    import ray
    from mlflow.tracking import MlflowClient

    from search.run import run_search

    folder = tmp_path_factory.mktemp("promote")
    raw = {"name": NAME, "data": {"train": shapes["train"], "val": shapes["val"]},
           "search": {"space": "lite_cpu", "trials": len(STAGES), "max_concurrent_trials": 1, "seed": 1,
                      "max_gflops": BUDGET},
           "train": {"epochs": 2}, "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "max_failures": 0},
           "storage_path": str(folder / "trials")}
    uri = empty_mlflow_store(folder)
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this module
    try:
        import mlflow

        mlflow.set_tracking_uri(uri)
        outcome = run_search(parse_job(raw), store=folder / "store", say=lambda _: None, trainable=_staged_trial)
        ray.shutdown()
        yield outcome, MlflowClient(uri), shapes
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        patch.undo()


def _runs(client, outcome):
    runs = client.search_runs([outcome.experiment_id], f"tags.`{PARENT_TAG}` = '{outcome.parent_run_id}'")
    by_state = {}
    for run in runs:
        by_state.setdefault(run.data.tags.get(STATE_TAG), []).append(run)
    return by_state


def _off_frontier_with_model(client, outcome):
    """The complete runs off the frontier that logged a model, in the store's order: the first is the one that
    tests promote with force, so that whatever order the tests run in, the others stay collectable."""
    return [r for r in _runs(client, outcome)[COMPLETE]
            if r.data.tags[FRONTIER_TAG] == "false" and MODEL_URI_TAG in r.data.tags]


def _one_line_refusal(capsys, *argv) -> str:
    capsys.readouterr()  # what earlier calls printed
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("effsearch: error: ") and err.count("\n") == 1, err
    return err


def test_the_search_left_runs_in_every_state(store):
    outcome, client, _ = store
    by_state = _runs(client, outcome)
    assert {COMPLETE, PRUNED, FAILED, INFEASIBLE} <= set(by_state), {k: len(v) for k, v in by_state.items()}
    complete = by_state[COMPLETE]
    assert sum(MODEL_URI_TAG in r.data.tags for r in complete) == len(complete) - 1  # the no_model stage
    assert any(r.data.tags.get(FRONTIER_TAG) == "false" and MODEL_URI_TAG in r.data.tags for r in complete)


def test_the_budget_picks_the_best_frontier_run_within_it(store):
    outcome, client, _ = store
    front = compute_frontier(complete_trials(client, outcome.experiment_id))
    assert len(front) >= 2, "the fixture needs two frontier runs of different cost"
    budget = sorted(p.gflops for p in front)[-2]  # excludes the costliest
    expected = max((p for p in front if p.gflops <= budget), key=lambda p: p.map)
    promotion = promote(client, NAME, max_gflops=budget, model_name="budget-choice")
    assert promotion.run_id == expected.run_id and promotion.changed
    assert str(client.get_model_version_by_alias("budget-choice", PRODUCTION).version) == promotion.version
    by_params = promote(client, NAME, max_params_m=expected.params_m, model_name="params-choice")
    fits = [p for p in front if p.params_m <= expected.params_m]
    assert by_params.run_id == max(fits, key=lambda p: p.map).run_id


def test_nothing_within_the_budget_is_one_line(store, capsys):
    err = _one_line_refusal(capsys, "promote", NAME, "--max-gflops", "0.0001")
    assert "fits within 0.0001 GFLOPs; the cheapest frontier model needs" in err


def test_run_id_aliases_rollback_and_idempotence(store):
    outcome, client, _ = store
    name = "aliases"
    front = sorted(compute_frontier(complete_trials(client, outcome.experiment_id)), key=lambda p: p.gflops)
    first = promote(client, NAME, run_id=front[0].run_id, model_name=name)
    assert first.previous_version is None and first.run_id == front[0].run_id
    second = promote(client, NAME, run_id=front[1].run_id, model_name=name)
    assert (str(client.get_model_version_by_alias(name, PRODUCTION).version), str(client.get_model_version_by_alias(
        name, PREVIOUS).version)) == (second.version, first.version)

    again = promote(client, NAME, run_id=front[1].run_id, model_name=name)  # running it twice changes nothing
    assert not again.changed and again.version == second.version
    assert len(client.search_model_versions(f"name = '{name}'")) == 2

    back = rollback(client, name)
    assert back.version == first.version and back.run_id == front[0].run_id
    assert (str(client.get_model_version_by_alias(name, PRODUCTION).version), str(client.get_model_version_by_alias(
        name, PREVIOUS).version)) == (first.version, second.version)
    # Promoting the rolled-back run again reuses its version: no third version.
    promote(client, NAME, run_id=front[1].run_id, model_name=name)
    assert str(client.get_model_version_by_alias(name, PRODUCTION).version) == second.version
    assert len(client.search_model_versions(f"name = '{name}'")) == 2


def test_rollback_without_a_previous_version_is_one_line(store, capsys):
    outcome, client, _ = store
    front = compute_frontier(complete_trials(client, outcome.experiment_id))
    promote(client, NAME, run_id=front[0].run_id, model_name="single")
    err = _one_line_refusal(capsys, "promote", NAME, "--rollback", "--model-name", "single")
    assert "no previous version to roll back to" in err


@pytest.mark.parametrize("state, message", [(PRUNED, "was pruned (stopped by the scheduler after epoch 1 of 2)"),
                                            (FAILED, "did not finish (status FAILED, state failed): "),
                                            (INFEASIBLE, "did not finish (status FINISHED, state infeasible): "
                                                         "over budget")])
def test_runs_that_did_not_complete_are_refused(store, capsys, state, message):
    outcome, client, _ = store
    run = _runs(client, outcome)[state][0]
    err = _one_line_refusal(capsys, "promote", NAME, "--run-id", run.info.run_id, "--model-name", "refused")
    assert message in err
    assert not client.search_model_versions("name = 'refused'")


def test_a_run_off_the_frontier_needs_force_and_one_without_a_model_is_refused(store, capsys):
    outcome, client, _ = store
    complete = _runs(client, outcome)[COMPLETE]
    off = _off_frontier_with_model(client, outcome)[0]
    err = _one_line_refusal(capsys, "promote", NAME, "--run-id", off.info.run_id, "--model-name", "forced")
    assert "is not on the frontier; --force promotes it anyway" in err
    assert main(["promote", NAME, "--run-id", off.info.run_id, "--force", "--model-name", "forced"]) == 0
    out, err = capsys.readouterr()  # MLflow's own "Successfully registered model" lines went to stderr
    assert err == "" and out.startswith(f"promoted run {off.info.run_name} ({off.info.run_id})"), (out, err)
    assert client.get_model_version_by_alias("forced", PRODUCTION).tags["run_id"] == off.info.run_id
    no_model = next(r for r in complete if MODEL_URI_TAG not in r.data.tags)
    err = _one_line_refusal(capsys, "promote", NAME, "--run-id", no_model.info.run_id, "--force")
    assert "has no logged model" in err
    err = _one_line_refusal(capsys, "promote", NAME, "--run-id", "0" * 32)
    assert f"no run {'0' * 32}" in err
    err = _one_line_refusal(capsys, "promote", NAME, "--run-id", outcome.parent_run_id)
    assert f"is a search's run, not a trial's; `effsearch frontier {NAME}` lists the trials' run ids" in err


def test_a_version_carries_its_lineage(store):
    outcome, client, shapes = store
    front = compute_frontier(complete_trials(client, outcome.experiment_id))
    promotion = promote(client, NAME, run_id=front[-1].run_id, model_name="lineage")
    tags = client.get_model_version("lineage", promotion.version).tags
    run = client.get_run(promotion.run_id)
    assert tags["experiment"] == NAME and tags["experiment_id"] == outcome.experiment_id
    assert tags["parent_run_id"] == outcome.parent_run_id and tags["run_id"] == promotion.run_id
    assert math.isclose(float(tags["map"]), run.data.metrics["map"], abs_tol=1e-4)
    assert math.isclose(float(tags["gflops"]), run.data.metrics["gflops"], abs_tol=1e-4)
    spec = json.loads(tags["spec"])
    assert spec["image_size"] == run.data.params["image_size"] and "num_classes" in spec
    for split in ("train", "val"):
        digest = hashlib.sha256(open(shapes[split]["annotations"], "rb").read()).hexdigest()
        assert tags[f"data.{split}.sha256"] == digest
    assert tags["effsearch.epochs"] == "2" and tags["effsearch.data_hash"] == run.data.tags["effsearch.data_hash"]


def test_gc_lists_then_deletes_only_unregistered_models_off_the_frontier(store, capsys, tmp_path):
    from pathlib import Path

    from mlflow.exceptions import MlflowException

    from search.model_gc import MODEL_DELETED_TAG, collectable

    outcome, client, _ = store
    # What gc must keep, registered here so that the test does not lean on the promotions of the tests before it:
    # a frontier run, and one of the two dominated runs with a model (promoted with force).
    front = compute_frontier(complete_trials(client, outcome.experiment_id))
    promote(client, NAME, run_id=front[0].run_id, model_name="gc-kept")
    dominated = [r.info.run_id for r in _off_frontier_with_model(client, outcome)]
    assert len(dominated) >= 2, "the fixture has two dominated runs with models"
    promote(client, NAME, run_id=dominated[0], force=True, model_name="gc-kept-off")  # the one the force test takes
    registered = {v.tags.get("run_id") for v in client.search_model_versions()}
    expected = set(dominated) - registered
    assert dominated[0] not in expected and expected
    assert {c.run_id for c in collectable(client, NAME)} == expected
    assert main(["gc", NAME]) == 0
    assert "would delete" in capsys.readouterr().out
    assert {c.run_id for c in collectable(client, NAME)} == expected  # a dry run deletes nothing
    folders = [Path(client.get_logged_model(c.model_uri.removeprefix("models:/")).artifact_location
                    .removeprefix("file://")) for c in collectable(client, NAME)]
    assert all((folder / "MLmodel").is_file() for folder in folders)
    assert main(["gc", NAME, "--delete"]) == 0
    assert collectable(client, NAME) == []
    for run_id in expected:
        tags = client.get_run(run_id).data.tags
        assert MODEL_URI_TAG not in tags
        with pytest.raises(MlflowException, match="not found"):
            client.get_logged_model(tags[MODEL_DELETED_TAG].removeprefix("models:/"))
    assert not any((folder / "MLmodel").exists() for folder in folders)
    # Registered models still load.
    import mlflow.pytorch

    for name in ("gc-kept", "gc-kept-off"):
        assert mlflow.pytorch.load_model(f"models:/{name}@{PRODUCTION}", dst_path=str(tmp_path)) is not None
    with pytest.raises(PromotionRefused):
        rollback(client, "no-such-model")


def test_a_model_name_mlflow_cannot_register_is_refused_in_one_line(tmp_path):
    """MLflow's own refusal came as a 40-line traceback, after the choice of run."""
    from mlflow.tracking import MlflowClient

    from conftest import empty_mlflow_store
    from search.promote import PromotionRefused, promote

    client = MlflowClient(empty_mlflow_store(tmp_path))
    with pytest.raises(PromotionRefused, match=r"^promote --model-name: 'bad/name' is the registered model's name, "
                                               r"and MLflow's model names cannot contain '/' or ':'$"):
        promote(client, "anything", max_gflops=1.0, model_name="bad/name")
    with pytest.raises(PromotionRefused, match=r"^promote EXPERIMENT: 'team:x' is .*; give --model-name$"):
        promote(client, "team:x", max_gflops=1.0)


def test_a_run_of_an_older_epoch_budget_is_not_promoted_by_its_own_frontier_tag(tmp_path, monkeypatch, capsys):
    """Two searches of one experiment with 1 and then 2 epochs: the 1-epoch run still leads its own budget (its
    frontier tag stays true, which gc relies on), but promotion compares with the latest search, as `frontier`
    does, and says why it refuses."""
    from mlflow.tracking import MlflowClient

    from search.lineage import Comparable

    uri = empty_mlflow_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("budgets")
    trials = {}
    for start, epochs in ((1_000, 1), (2_000, 2)):
        among = Comparable("d" * 16, epochs).tags()
        parent = client.create_run(experiment_id, start_time=start, tags={"effsearch.kind": "search", **among})
        trial = client.create_run(experiment_id, start_time=start + 1, tags={
            PARENT_TAG: parent.info.run_id, STATE_TAG: COMPLETE, FRONTIER_TAG: "true", MODEL_URI_TAG: "models:/m-1",
            **among})
        client.log_metric(trial.info.run_id, "map", 0.5 if epochs == 1 else 0.3)
        client.log_metric(trial.info.run_id, "gflops", 0.1)
        for run in (parent, trial):
            client.set_terminated(run.info.run_id, "FINISHED")
        trials[epochs] = trial.info.run_id
    err = _one_line_refusal(capsys, "promote", "budgets", "--run-id", trials[1])
    assert (f"run {trials[1]} (" in err and "was trained on other data or another epoch budget "
            f"(data {'d' * 16}, 1 epoch) than the latest search (data {'d' * 16}, 2 epochs)" in err
            and "--force promotes it anyway" in err), err
