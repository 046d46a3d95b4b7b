"""A 2-worker data-parallel trial (gloo, CPU SyncBN) inside a real Tune search."""
import pytest
from conftest import searched_store

from search.tracking import PARENT_TAG


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """16 training images and 4 to score: two batches of 4 per rank an epoch, and two images for each rank to
    score."""
    from trainers.shapes import make_shapes

    return make_shapes(tmp_path_factory.mktemp("small"), train_images=16, val_images=4, seed=3)


@pytest.fixture(scope="module")
def two_worker_run(tmp_path_factory, small):
    raw = {
        "name": "two-workers",
        "data": {"train": small["train"], "val": small["val"]},
        "search": {"space": "lite_cpu", "trials": 1, "seed": 0},
        "train": {"epochs": 2, "batch_size": 4, "eval_every": 1},
        "resources": {"workers_per_trial": 2, "cpus_per_worker": 1},
    }
    folder = tmp_path_factory.mktemp("dist")
    with searched_store(folder, raw) as (outcome, client):
        runs = client.search_runs([outcome.experiment_id],
                                  filter_string=f"tags.`{PARENT_TAG}` = '{outcome.parent_run_id}'")
        yield outcome, client, runs, folder / "store"


@pytest.fixture(scope="module")
def center_two_worker_run(tmp_path_factory, small):
    """One 2-worker trial of the anchor-free center head, whose last neck cell leaves the levels it does not read
    without a gradient: 2 steps a rank in its one epoch."""
    raw = {
        "name": "two-workers-center",
        "data": {"train": small["train"], "val": small["val"]},
        "search": {"space": ["lite_cpu", "detector"], "trials": 1, "seed": 0, "scheduler": "fifo",
                   "bounds": {"detector": {"heads": ["center"], "necks": ["bifpn"]}}},
        "train": {"epochs": 1, "batch_size": 4},
        "resources": {"workers_per_trial": 2, "cpus_per_worker": 1},
    }
    with searched_store(tmp_path_factory.mktemp("dist-center"), raw) as (outcome, client):
        yield outcome, client


def test_trial_trains_on_two_disjoint_shards(two_worker_run):
    outcome, client, runs, _ = two_worker_run
    assert outcome.finished == 1 and len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    for step_metric in ("world_size", "shard_overlap", "train_images"):
        history = client.get_metric_history(run.info.run_id, step_metric)
        assert len(history) == 2, step_metric
    assert {m.value for m in client.get_metric_history(run.info.run_id, "world_size")} == {2}
    assert {m.value for m in client.get_metric_history(run.info.run_id, "shard_overlap")} == {0}
    # 16 training images, 8 per rank, two batches of 4 per rank: all 16 seen each epoch.
    assert {m.value for m in client.get_metric_history(run.info.run_id, "train_images")} == {16}


def test_evaluation_gathers_every_rank(two_worker_run):
    outcome, client, runs, _ = two_worker_run
    history = client.get_metric_history(runs[0].info.run_id, "eval_images")
    # 4 validation images, split 2 and 2 across the ranks, all scored by rank 0.
    assert [m.value for m in history] == [4, 4]
    assert 0.0 <= runs[0].data.metrics["map"] <= 1.0


def test_rank_0_saves_the_model_in_its_last_checkpoint_and_the_driver_logs_that(two_worker_run):
    """The Train workers' loop saves the MLflow model folder into rank 0's last checkpoint (config["before_report"]);
    the driver's logged model is that folder's graph."""
    import filecmp
    from pathlib import Path

    from search.logged_model import MLMODEL, MODEL_FOLDER
    from search.tracking import MODEL_URI_TAG

    _, client, runs, store = two_worker_run
    (saved,) = [path.parent for path in store.rglob(f"{MODEL_FOLDER}/{MLMODEL}")]
    model = client.get_logged_model(runs[0].data.tags[MODEL_URI_TAG].removeprefix("models:/"))
    logged = Path(model.artifact_location.removeprefix("file://"))
    assert filecmp.cmp(logged / "data" / "model.pt2", saved / "data" / "model.pt2", shallow=False)


def test_a_center_head_trains_on_two_workers(center_two_worker_run):
    """DDP must be told that some parameters get no gradient (trainers.loop.ddp_options); without it the second step
    failed with "Expected to have finished reduction in the prior iteration"."""
    outcome, client = center_two_worker_run
    (run,) = client.search_runs([outcome.experiment_id], f"tags.`{PARENT_TAG}` = '{outcome.parent_run_id}'")
    assert outcome.finished == 1 and outcome.failed == 0, outcome.first_error
    assert run.data.params["head"] == "center" and run.data.metrics["world_size"] == 2
    assert run.data.metrics["train_images"] == 16
