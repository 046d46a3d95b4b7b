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

SPEC = ModelSpec(num_classes=3, backbone_family="efficientnet_lite", backbone_width=0.5, backbone_depth=0.5,
                 image_size=128, max_level=5, anchor_scale=1.5, fpn_channels=32, fpn_repeats=1, head_repeats=2,
                 bn_momentum=0.1)
RECIPE = TrainConfig(epochs=5, batch_size=8, eval_every=1, threads=1, loader_workers=1)


def _train_worker_pids() -> list[int]:
    """The Train worker processes of the Ray runtime this test started: descendants of this process.

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
            if any("RayTrainWorker" in part for part in process.cmdline()):
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


def _kill_after_checkpoints(run_folder, count: int, done: threading.Event) -> list[int]:
    killed: list[int] = []
    while not done.is_set():
        if _registered_checkpoints(run_folder) >= count:
            for pid in _train_worker_pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            return killed
        time.sleep(0.1)
    return killed


def test_killed_worker_continues_from_its_checkpoint_and_ends_like_an_uninterrupted_run(shapes, tmp_path):
    plan = TrialPlan(SPEC, training_data(shapes), RECIPE)
    uninterrupted = fit(plan, lambda metrics, checkpoint: None)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
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
        killer = threading.Thread(target=lambda: killed.extend(_kill_after_checkpoints(tmp_path / "resume", 2, done)))
        killer.start()
        try:
            result = trainer.fit()
        finally:
            done.set()
            killer.join()
    finally:
        ray.shutdown()

    assert killed, "the worker was never killed"
    final = result.metrics
    print(f"killed pids {killed}; resumed from epoch {final['resumed_from_epoch']}; final AP {final['map']:.4f} "
          f"(uninterrupted {uninterrupted['map']:.4f})")
    # The run was killed during epoch 3 or later and went on from the checkpoint Ray had registered.
    assert final["epoch"] == RECIPE.epochs and 1 <= final["resumed_from_epoch"] < RECIPE.epochs
    for key in ("loss", "map", "map_raw", "map_ema", "map50", "lr"):
        assert final[key] == pytest.approx(uninterrupted[key], rel=1e-5, abs=1e-7), key
