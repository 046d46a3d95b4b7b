"""`effsearch demo --detector`: a detector-space search, its frontier, promotion, and predict with either head."""
import json

import pytest
from conftest import empty_mlflow_store
from mlflow.tracking import MlflowClient

from search.cli import main
from search.demo import DETECTOR_DEMO_SEARCH
from trainers.shapes import make_shapes

EXPERIMENT = DETECTOR_DEMO_SEARCH["name"]


@pytest.fixture(scope="module")
def detector_demo(tmp_path_factory):
    """The demo path with the detector space, shortened: 2 trials (its two enqueued points, one per head) of 1 epoch,
    on a smaller shapes set than the demo's (the demo writes its own only where none exists)."""
    import mlflow
    import ray

    folder = tmp_path_factory.mktemp("detector-demo")
    make_shapes(folder / "demo" / "shapes", train_images=96, val_images=24, seed=5)
    uri = empty_mlflow_store(folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(folder)
        mlflow.set_tracking_uri(uri)
        ray_was_up = ray.is_initialized()  # an earlier module's Ray, which the command must leave up
        try:
            code = main(["demo", "--detector", "--dir", str(folder / "demo"), "--trials", "2", "--epochs", "1"])
            ray_left_up = ray.is_initialized() and not ray_was_up
        finally:
            ray.shutdown()
        yield {"code": code, "folder": folder, "client": MlflowClient(uri), "patch": patch, "ray_left_up": ray_left_up}


def _children(client):
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], "tags.`mlflow.parentRunId` != ''")


def test_the_search_trains_both_heads_and_records_their_choices(detector_demo):
    assert detector_demo["code"] == 0
    assert not detector_demo["ray_left_up"]  # the command stops the Ray it started (search/cli.py, _stop_ray)
    runs = _children(detector_demo["client"])
    assert len(runs) == 2
    assert {r.data.tags["effsearch.state"] for r in runs} == {"complete"}
    heads = {r.data.params["head"]: r for r in runs}
    assert set(heads) == {"anchor", "center"}  # the two enqueued points
    assert heads["anchor"].data.params["neck"] == "bifpn" and heads["anchor"].data.params["train.mixup_prob"] == "0.0"
    for run in runs:
        assert {"neck", "head", "label_smoothing", "train.mixup_prob", "box_loss", "assigner"} <= set(run.data.params)
        assert run.data.metrics["gflops"] > 0 and "map" in run.data.metrics
    parent = detector_demo["client"].get_run(runs[0].data.tags["mlflow.parentRunId"])
    artifacts = {a.path for a in detector_demo["client"].list_artifacts(parent.info.run_id)}
    assert {"frontier.csv", "frontier.png", "frontier.html"} <= artifacts


def test_the_promoted_model_and_the_center_head_predict(detector_demo, capsys):
    folder, client = detector_demo["folder"], detector_demo["client"]
    images = folder / "demo" / "shapes" / "val" / "images"
    # The demo promoted its pick; predict writes detections.json in the working folder by default.
    assert main(["predict", f"models:/{EXPERIMENT}@production", str(images), "--score-threshold", "0"]) == 0
    detections = json.loads((folder / "detections.json").read_text())
    assert len({d["file_name"] for d in detections}) == 24
    assert all(d["category_id"] in {1, 3, 5} and len(d["bbox"]) == 4 for d in detections)
    # Whichever head won, the center head's trial promotes by run id and predicts too.
    center = next(r for r in _children(client) if r.data.params["head"] == "center")
    assert main(["promote", EXPERIMENT, "--run-id", center.info.run_id, "--force"]) == 0
    out = folder / "center.json"
    assert main(["predict", f"models:/{EXPERIMENT}@production", str(images), "--score-threshold", "0",
                 "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len({d["file_name"] for d in rows}) == 24 and all(d["score"] >= 0 for d in rows)
    assert capsys.readouterr().err.count("Traceback") == 0
