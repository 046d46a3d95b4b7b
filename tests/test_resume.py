"""A trial's training worker is killed after an epoch; Ray Train restarts it from its last checkpoint."""
import json
import os
import signal
import threading
import time

import psutil
import pytest
import ray
import ray.train
from conftest import training_data
from ray.train.torch import TorchTrainer

from trainers.loop import TrialPlan, fit, train_worker
from trainers.recipe import TrainConfig
from trainers.spec import ModelSpec
from conftest import empty_mlflow_store

SPEC = ModelSpec(num_classes=3, backbone_family="efficientnet_lite", backbone_width=0.5, backbone_depth=0.5,
                 image_size=128, max_level=5, anchor_scale=1.5, fpn_channels=32, fpn_repeats=1, head_repeats=2,
                 bn_momentum=0.1)
RECIPE = TrainConfig(epochs=5, batch_size=8, eval_every=1, threads=1, loader_workers=1)


def _descendant_pids(marker: str) -> list[int]:
    """Processes of the Ray runtime this test started whose command line holds `marker`: descendants of this
    process.

    ray.init started the raylet as this process's child, and the raylet started the workers, so only those
    are candidates: another user's Ray on a shared machine is never touched.
    """
    try:
        descendants = psutil.Process(os.getpid()).children(recursive=True)
    except psutil.Error:  # one of them ended during the walk: look again on the next poll
        return []
    pids = []
    for process in descendants:
        try:
            if any(marker in part for part in process.cmdline()):
                pids.append(process.pid)
        except psutil.Error:  # it ended while we looked
            pass
    return pids


def _registered_checkpoints(run_folder) -> int:
    """How many checkpoints Ray Train has registered (not merely written: a report counts once every rank's
    has arrived, and the controller lags behind on a loaded machine). Its checkpoint manager records them in
    this snapshot each time it registers one."""
    try:
        snapshot = json.loads((run_folder / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return 0
    return len(snapshot.get("checkpoint_results") or [])


def _kill_when(ready, marker: str, done: threading.Event) -> list[int]:
    """Once ready() holds, SIGKILL this test's processes marked `marker`; gives up when `done` is set."""
    killed: list[int] = []
    while not done.is_set():
        if ready():
            for pid in _descendant_pids(marker):
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            return killed
        time.sleep(0.1)
    return killed


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for both tests, started as a search starts its own (search.ray_runtime.start_ray), so the
    second test's search joins it; as this process's child, its workers are what _descendant_pids finds."""
    from search.ray_runtime import start_ray

    start_ray(None)
    yield
    ray.shutdown()


def test_killed_worker_continues_from_its_checkpoint_and_ends_like_an_uninterrupted_run(tmp_path, local_ray):
    from trainers.shapes import make_shapes

    # Two batches of 8 an epoch and 4 images to score: the run is trained twice (uninterrupted, then killed and
    # resumed), and what is compared does not depend on how many images an epoch holds.
    small = make_shapes(tmp_path / "shapes", train_images=16, val_images=4, seed=3)
    plan = TrialPlan(SPEC, training_data(small), RECIPE)
    uninterrupted = fit(plan, lambda metrics, checkpoint: None)

    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"plan": plan},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(
            name="resume", storage_path=str(tmp_path), failure_config=ray.train.FailureConfig(max_failures=1),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    done = threading.Event()
    killed: list[int] = []
    killer = threading.Thread(target=lambda: killed.extend(_kill_when(
        lambda: _registered_checkpoints(tmp_path / "resume") >= 2, "RayTrainWorker", done)))
    killer.start()
    try:
        result = trainer.fit()
    finally:
        done.set()
        killer.join()

    assert killed, "the worker was never killed"
    final = result.metrics
    print(f"killed pids {killed}; resumed from epoch {final['resumed_from_epoch']}; final AP {final['map']:.4f} "
          f"(uninterrupted {uninterrupted['map']:.4f})")
    # The run was killed during epoch 3 or later and went on from the checkpoint Ray had registered.
    assert final["epoch"] == RECIPE.epochs and 1 <= final["resumed_from_epoch"] < RECIPE.epochs
    for key in ("loss", "map", "map_raw", "map_ema", "map50", "lr"):
        assert final[key] == pytest.approx(uninterrupted[key], rel=1e-5, abs=1e-7), key


def test_a_killed_one_worker_trial_continues_from_its_tune_checkpoint(shapes, tmp_path, monkeypatch, local_ray):
    """A one-worker trial trains in its Tune trial: killing that process after its checkpoints began makes Tune
    restart the trial (resources.max_failures: 1), which continues from that checkpoint and completes, in one
    MLflow run."""
    from mlflow.tracking import MlflowClient

    from search.job import parse_job
    from search.run import run_search
    from search.states import COMPLETE, STATE_TAG
    from search.tracking import PARENT_TAG

    raw = {"name": "kill-trial", "data": {"train": shapes["train"], "val": shapes["val"]},
           "search": {"space": "lite_cpu", "trials": 1, "scheduler": "fifo", "seed": 0},
           "train": {"epochs": 3, "batch_size": 8, "eval_every": 1},
           "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "max_failures": 1}}
    uri = empty_mlflow_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    done = threading.Event()
    killed: list[int] = []

    # Tune's function-trainable actors are the one-worker trials' processes. The kill waits for epoch 2's
    # checkpoint folder: by then Tune has registered epoch 1's (a folder appears before Tune registers it, and a
    # kill in that gap restarts the trial from scratch, as it should, but then nothing is resumed to check).
    trials = tmp_path / "store" / "ray"
    killer = threading.Thread(target=lambda: killed.extend(_kill_when(
        lambda: any(trials.glob("kill-trial-*/*/checkpoint_000001")), "ImplicitFunc", done)))
    killer.start()
    try:
        outcome = run_search(parse_job(raw), store=tmp_path / "store", say=lambda _: None)  # on the module's Ray
    finally:
        done.set()
        killer.join()

    assert killed, "the trial's process was never killed"
    client = MlflowClient(uri)
    (run,) = client.search_runs([outcome.experiment_id], f"tags.`{PARENT_TAG}` = '{outcome.parent_run_id}'")
    assert outcome.finished == 1 and run.data.tags[STATE_TAG] == COMPLETE
    assert run.data.metrics["resumed_from_epoch"] >= 1
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "map")) == 3
