"""Searches on a real multi-node Ray cluster on this machine (ray.cluster_utils), with fake GPU resources."""
import json
import os
import time
from itertools import combinations

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.tune import Callback

from conftest import start_cluster
from conftest import empty_mlflow_store
from search.job import parse_job
from search.run import run_search
from search.trainable import run_trial

# Where the stand-in worker loop writes what each worker saw; set by the test before the search pickles it.
_PLACEMENTS = {"folder": ""}


def _report_placement(config: dict) -> None:
    """Ray Train's per-worker loop, in place of training: records the worker's node, its own GPU ids and
    CUDA_VISIBLE_DEVICES, holds its GPU for 2 s, and reports one scored epoch. Before the hold, each worker waits
    (up to 2 minutes) until a worker of the other trial has arrived too: two worker groups on two busy cores may be
    up seconds apart, and trials that do run side by side must then be seen to."""
    import ray.train

    context = ray.train.get_context()
    folder, run = _PLACEMENTS["folder"], context.get_experiment_name()
    open(os.path.join(folder, f"arrived-{run}-{context.get_world_rank()}"), "w").close()
    deadline = time.time() + 120
    while time.time() < deadline and len({p.rsplit("-", 1)[0] for p in os.listdir(folder)
                                          if p.startswith("arrived-")}) < 2:
        time.sleep(0.1)
    start = time.time()
    time.sleep(2)
    record = {"run": run, "rank": context.get_world_rank(),
              "node": ray.get_runtime_context().get_node_id(),
              "gpus": ray.get_runtime_context().get_accelerator_ids()["GPU"],
              "visible": os.environ.get("CUDA_VISIBLE_DEVICES", ""), "start": start, "end": time.time()}
    with open(os.path.join(folder, f"{record['run']}-{record['rank']}.json"), "w") as f:
        json.dump(record, f)
    gflops = 0.05 + 0.001 * len(config["plan"].spec.to_dict()["backbone_family"])
    ray.train.report({"epoch": 1, "loss": 1.0, "map": 0.3, "gflops": gflops, "full_budget": 1})


def _placed_trial(config, *, setup):
    """The real trial (run_trial: its TorchTrainer, scaling config and placement) with the stand-in loop; gloo,
    since the GPUs are fake and NCCL needs real ones."""
    from dataclasses import replace

    run_trial(config, setup=replace(setup, worker_loop=_report_placement, torch_backend="gloo"))


@pytest.fixture(scope="module")
def two_nodes():
    """A head that offers no CPU, as in cluster.yaml (whatever a trial reserves lands on the worker nodes), and two
    worker nodes of 2 CPUs and 2 fake GPUs each; the searches reach it through RAY_ADDRESS. One cluster for the
    module: the placement test uses it whole, and the lost-node test, which comes last, removes one of its nodes.
    Its Ray temp folder is its own (short: Ray's socket paths must fit 107 characters), so that its address file
    is not the machine's."""
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="r", dir="/tmp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_TMPDIR", folder)
        cluster = start_cluster(num_cpus=0)
        try:
            for _ in range(2):
                cluster.add_node(num_cpus=2, num_gpus=2)
            cluster.wait_for_nodes()
            patch.setenv("RAY_ADDRESS", cluster.address)
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(folder, ignore_errors=True)


def test_trials_of_two_gpu_workers_each_share_a_node_and_no_gpu_is_double_booked(
        tmp_path, shapes, two_nodes, monkeypatch, module_by_value):
    """2 trials of 2 workers x 1 GPU side by side fill two nodes of 2 GPUs and 2 CPUs. When each trial's driver
    reserved 0.01 CPU on a GPU node, a trial's workers no longer fit on one node and were split over both. (Two
    trials on nodes of 2 show it as four on nodes of 4 did, with half the Train worker groups to start.)"""
    gpu_nodes = {node.node_id for node in two_nodes.worker_nodes}
    _PLACEMENTS["folder"] = str(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", empty_mlflow_store(tmp_path))
    raw = {"name": "gpus", "data": {"train": shapes["train"], "val": shapes["val"]},
           "search": {"space": "lite_cpu", "trials": 2, "max_concurrent_trials": 2, "scheduler": "fifo"},
           "train": {"epochs": 1},
           "resources": {"workers_per_trial": 2, "gpus_per_worker": 1, "cpus_per_worker": 1}}
    outcome = run_search(parse_job(raw), store=tmp_path / "store", say=lambda _: None, trainable=_placed_trial)
    assert outcome.finished == 2 and outcome.failed == 0

    records = [json.loads(p.read_text()) for p in tmp_path.glob("train-*.json")]
    trials = {r["run"] for r in records}
    assert len(trials) == 2 and len(records) == 4
    for run in trials:
        workers = [r for r in records if r["run"] == run]
        assert sorted(w["rank"] for w in workers) == [0, 1]
        (node,) = {w["node"] for w in workers}  # the trial's workers share one node
        assert node in gpu_nodes
        for w in workers:
            assert len(w["gpus"]) == 1  # each worker its own accelerator
            # Ray Train shows co-located workers each other's GPUs (for NCCL's peer access), its own among them.
            assert w["gpus"][0] in w["visible"].split(",")
    for a, b in combinations(records, 2):
        if a["node"] == b["node"] and a["gpus"] == b["gpus"]:
            assert a["end"] <= b["start"] or b["end"] <= a["start"], (a, b)  # never two workers on one GPU at once
    # The trials ran side by side, so the check above had something to check.
    assert any(a["start"] < b["end"] and b["start"] < a["end"] for a, b in combinations(records, 2)
               if a["run"] != b["run"])


_CLUSTERS: dict[str, Cluster] = {}


class _KillNodeMidSearch(Callback):
    """Once a trial has finished and another has reported its second epoch (so Tune holds its first epoch's
    checkpoint), removes the worker node that runs that trial, as a lost or preempted machine would go."""

    def __init__(self, cluster: Cluster):
        _CLUSTERS["lost-node"] = cluster  # not an attribute: Tune pickles its callbacks with its own state
        self.finished: dict[str, float] = {}  # trial id: its AP, as it finished
        self.killed_trials: dict[str, int] = {}  # trial id: the last epoch it had reported
        self.running: dict[str, tuple[int, int]] = {}  # trial id: its process, its last epoch

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.running[trial.trial_id] = (result["pid"], result.get("epoch", 0))
        if self.killed_trials or not self.finished or result.get("epoch", 0) != 2:  # epoch 2 of 3: one to go
            return
        node = self._node_of(result["pid"])
        if node is None:
            return
        self.killed_trials = {tid: epoch for tid, (pid, epoch) in self.running.items()
                              if tid not in self.finished and self._node_of(pid) is node}
        _CLUSTERS["lost-node"].remove_node(node, allow_graceful=False)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished.setdefault(trial.trial_id, trial.last_result["map"])

    def _node_of(self, pid: int):
        import psutil

        try:
            ancestors = {p.pid for p in psutil.Process(pid).parents()}
        except psutil.NoSuchProcess:
            return None
        for node in _CLUSTERS["lost-node"].worker_nodes:
            if node.all_processes["raylet"][0].process.pid in ancestors:
                return node
        return None


def test_a_lost_node_costs_no_finished_trial_and_its_trials_continue_from_their_checkpoints(
        tmp_path, shapes, two_nodes, monkeypatch):
    """A worker node dies in the middle of a real search (real training, resources.max_failures at its default,
    1): the trials it ran restart on the other node from their last checkpoint, the search ends with every trial
    it asked for, and the trials that had finished keep their one MLflow run and their results. On the module's
    cluster (its GPUs unused here: 1-CPU trials, two at a time), whose node it removes: this test comes last."""
    from mlflow.tracking import MlflowClient

    from search.states import COMPLETE, STATE_TAG
    from search.tracking import PARENT_TAG, TRIAL_ID_TAG

    uri = empty_mlflow_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    raw = {"name": "lost-node", "data": {"train": shapes["train"], "val": shapes["val"]},
           "search": {"space": "lite_cpu", "trials": 3, "max_concurrent_trials": 2, "scheduler": "fifo",
                      "sampler": "random"},
           "train": {"epochs": 3, "batch_size": 8, "eval_every": 1},
           "resources": {"cpus_per_worker": 1}}
    killer = _KillNodeMidSearch(two_nodes)
    outcome = run_search(parse_job(raw), store=tmp_path / "store", say=lambda _: None, callbacks=[killer])

    assert killer.killed_trials, "no node was removed while a trial ran on it"
    assert outcome.finished == 3 and outcome.failed == 0
    client = MlflowClient(uri)
    runs = client.search_runs([outcome.experiment_id], f"tags.`{PARENT_TAG}` = '{outcome.parent_run_id}'")
    by_trial = {r.data.tags[TRIAL_ID_TAG]: r for r in runs}
    assert len(runs) == len(by_trial) == 3  # one run per trial: no trial recorded twice
    assert all(r.data.tags[STATE_TAG] == COMPLETE and r.info.status == "FINISHED" for r in runs)
    for trial_id, epoch in killer.killed_trials.items():  # those with a checkpoint restarted from it
        if epoch >= 2:
            assert by_trial[trial_id].data.metrics["resumed_from_epoch"] >= 1
    for trial_id, ap in killer.finished.items():
        assert by_trial[trial_id].data.metrics["map"] == pytest.approx(ap)
    assert len(two_nodes.worker_nodes) == 1
