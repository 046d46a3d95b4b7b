"""A real search: local Ray, Tune trials proposed by OptunaSearch, recorded in a temporary MLflow store."""
import re
from dataclasses import replace
from pathlib import Path

import pytest
import ray
from conftest import empty_mlflow_store, searched_store
from ray import tune

from search.frontier import complete_trials, compute_frontier
from search.interrupts import HELD_NOTICE, RAY_STOP_NOTICE
from search.job import parse_job
from search.promote import PRODUCTION, promote
from search.searcher import REPEATS_ATTR
from search.states import COMPLETE, FAILED, INFEASIBLE, STATE_TAG
from search.tracking import FRONTIER_TAG, FULL_BUDGET_TAG, MODEL_URI_TAG, PARENT_TAG, REASON_TAG

# GFLOPs. With seed 1, the sampler's first random proposal costs 0.072 GFLOPs: over budget, so it never
# becomes a trial.
BUDGET = 0.06
@pytest.fixture(scope="module")
def search_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("search")


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory):
    """One batch of 8 training images and 4 to score: for the tests here that train for real, what they assert
    (the runs, their metrics and states, the models) does not depend on how many images an epoch holds."""
    from trainers.shapes import make_shapes

    return make_shapes(tmp_path_factory.mktemp("one-batch"), train_images=8, val_images=4, seed=3)


def _children(client, outcome):
    return client.search_runs([outcome.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{outcome.parent_run_id}'")


def _raw(shapes, name, **sections):
    """A test job on the shapes fixture, in the CPU-sized lite_cpu space unless its search section names one."""
    search = {"space": "lite_cpu", **sections.pop("search", {})}
    return {"name": name, "data": {"train": shapes["train"], "val": shapes["val"]}, "search": search, **sections}


class _CrashOnFirstResult(tune.Callback):
    """A fault in the driver's own loop (not in a trial): Tune's controller raises out of fit()."""

    def on_trial_result(self, iteration, trials, trial, result, **info):
        raise RuntimeError("the driver's loop broke")


def test_a_crash_of_the_driver_loop_leaves_no_run_running(tmp_path, one_batch):
    import ray
    from mlflow.tracking import MlflowClient

    from search.run import run_search

    raw = _raw(one_batch, "crash", search={"trials": 2, "max_concurrent_trials": 2},
               train={"epochs": 3, "batch_size": 8}, resources={"cpus_per_worker": 1})
    uri = empty_mlflow_store(tmp_path)
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    try:
        with pytest.raises(Exception) as raised:
            run_search(parse_job(raw), store=tmp_path / "store", say=lambda _: None,
                       callbacks=[_CrashOnFirstResult()])
    finally:
        ray.shutdown()
        patch.undo()
    chain, error = [], raised.value  # Tune may wrap the callback's error: it must be the one in the chain
    while error is not None and len(chain) < 10:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert any(isinstance(e, RuntimeError) and str(e) == "the driver's loop broke" for e in chain), chain
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("crash")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    assert len(runs) >= 2 and all(r.info.status in ("FINISHED", "FAILED", "KILLED") for r in runs)


@pytest.mark.parametrize("change, message", [
    ({"train": {"batch_size": 64}}, r"32 images are fewer than one global batch \(train.batch_size, 64, x "
                                    r"resources.workers_per_trial 1 = 64\)"),
    # A searched batch size: its largest choice must fit, whatever train.batch_size says.
    ({"search": {"space": ["lite_cpu", "training"], "bounds": {"training": {"batch_size": [8, 48]}}}},
     r"32 images are fewer than one global batch \(the largest of the space's batch_size choices, 48, x "),
    # Held by search.fixed: that value is the one that trains.
    ({"search": {"space": ["lite_cpu", "training"], "bounds": {"training": {"batch_size": [8, 48]}},
                 "fixed": {"batch_size": 48}}},
     r"32 images are fewer than one global batch \(search.fixed.batch_size, 48, x "),
    ({"data": "empty"}, r"annotations.json: the split has no images"),
])
def test_data_that_cannot_train_is_refused_before_ray_starts(tmp_path, shapes, change, message):
    import json

    import ray

    from search.run import run_search
    from trainers.validate import DataError

    raw = _raw(shapes, "refused", **{k: v for k, v in change.items() if k != "data"})
    if change.get("data") == "empty":
        empty = tmp_path / "annotations.json"
        empty.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
        raw["data"]["val"] = {"annotations": str(empty), "images": shapes["val"]["images"]}
    with pytest.raises(DataError, match=message):
        run_search(parse_job(raw), store=tmp_path / "store", say=lambda _: None)
    assert not ray.is_initialized()


@pytest.mark.parametrize("first", ["SIGINT", "SIGTERM"])  # Ctrl-C; a container's or a scheduler's stop
def test_ctrl_c_exits_130_and_marks_the_runs_killed(tmp_path, one_batch, first):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import yaml
    from mlflow.tracking import MlflowClient

    job = tmp_path / "job.yaml"
    # FIFO and epochs that cannot end first: on one batch an epoch takes about 0.3 s, and the default stopper
    # ended one trial (FINISHED, pruned, as it should stay) before the interrupt once.
    job.write_text(yaml.safe_dump(_raw(one_batch, "interrupted", search={"trials": 2, "max_concurrent_trials": 2,
                                                                         "scheduler": "fifo"},
                                       train={"epochs": 500, "batch_size": 8, "eval_every": 1},
                                       resources={"cpus_per_worker": 1})))
    uri = empty_mlflow_store(tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(Path(__file__).parents[1])}
    # Its own session, so that the clean-up below can reach every process this search started, by its group id.
    # Ctrl-C raising KeyboardInterrupt, as in a terminal: a test runner started in the background (a shell's `&`)
    # ignores SIGINT, and a child inherits that.
    terminal = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                "runpy.run_module('search.cli', run_name='__main__', alter_sys=True)")
    search = subprocess.Popen([sys.executable, "-c", terminal, "search", str(job)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        client, deadline, trained = MlflowClient(uri), time.monotonic() + 240, False
        while not trained and time.monotonic() < deadline and search.poll() is None:
            time.sleep(2)
            experiment = client.get_experiment_by_name("interrupted") if (tmp_path / "mlflow.db").exists() else None
            if experiment is not None:
                runs = client.search_runs([experiment.experiment_id], filter_string="metrics.loss > 0")
                trained = bool(runs)
        assert trained, "no trial reported an epoch within 240 s"
        # SIGTERM ends it as SIGINT does (ray.init had set it to sys.exit: the search died of SIGABRT, status -6).
        search.send_signal(getattr(signal, first))
        # And a Ctrl-C, as an impatient user presses: it lands while the runs close (search/interrupts.py holds it
        # there; before, it could cut the close short, or hang the exit for good in Tune's TensorBoard logger).
        time.sleep(0.5)
        search.send_signal(signal.SIGINT)
        try:
            out, err = search.communicate(timeout=120)
        except subprocess.TimeoutExpired as stuck:
            tails = [(stream or b"").decode(errors="replace")[-3000:] for stream in (stuck.stdout, stuck.stderr)]
            pytest.fail("the search did not end within 120 s of SIGINT; stdout:\n{}\nstderr:\n{}".format(*tails))
    finally:
        if search.poll() is None:
            os.killpg(search.pid, signal.SIGKILL)
            search.wait()
    assert search.returncode == 130, err[-2000:]
    said = [line for line in err.strip().splitlines() if line.startswith("effsearch:")]
    # One line says what happened (all runs closed); the second press adds at most the notice of what it waited for.
    outcome = [line for line in said if line not in (HELD_NOTICE, RAY_STOP_NOTICE)]
    assert len(outcome) == 1 and outcome[0].startswith("effsearch: interrupted;"), said
    # Nothing a user cannot act on: Ray's token notice, the raylet's worker-count warning, a traceback.
    assert "Token authentication" not in err and "Traceback" not in err
    assert "PYTHON worker processes" not in out + err, (out + err)[-2000:]  # Ray prints the raylet's on stdout
    runs = client.search_runs([experiment.experiment_id])
    parent = [r for r in runs if PARENT_TAG not in r.data.tags]
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    assert len(parent) == 1 and parent[0].info.status == "KILLED"
    assert children and all(r.info.status in ("KILLED", "FAILED") for r in children)
    assert all(r.data.tags[STATE_TAG] == FAILED for r in children)
    # Each says why it did not finish: the interrupt (a trial that had failed before it, its own error).
    killed = [r for r in children if r.info.status == "KILLED"]
    assert killed and all(r.data.tags[REASON_TAG].startswith("the search was stopped (Ctrl-C or SIGTERM)")
                          for r in killed)


def test_the_local_ray_of_a_search_does_not_warn_about_its_worker_count(tmp_path):
    """Each trial starts a burst of small actors (its driver, Train's controller, the workers, a report queue).
    At Ray's default threshold, 4x the CPU count, the raylet then printed "N PYTHON worker processes have
    been started ...", which a user cannot act on and Ray has no switch for; search/run.py raises the
    threshold for the Ray it starts. 40 idle actors at once make the same burst, faster than a search."""
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    script = textwrap.dedent("""
        import ray
        from search.ray_runtime import start_ray
        start_ray(None)
        @ray.remote(num_cpus=0)
        class Idle:
            def ping(self):
                return 1
        actors = [Idle.remote() for _ in range(40)]
        assert sum(ray.get([actor.ping.remote() for actor in actors])) == 40
        ray.shutdown()
    """)
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env["PYTHONPATH"] = str(Path(__file__).parents[1])
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    console = done.stdout + done.stderr  # Ray prints the raylet's lines on the driver's stdout
    assert done.returncode == 0, console[-2000:]
    assert "PYTHON worker processes" not in console, console[-2000:]


def _instant_trial(config, *, setup):
    """Stands in for training, for tests of the search machinery: reports the proposal's real GFLOPs and an
    AP that falls as they rise, at once."""
    from ray import tune

    from search.searcher import CostCounter

    gflops = CostCounter(setup.data.train.num_classes)(config["spec"]).gflops
    tune.report({"epoch": 1, "loss": 1.0, "map": 0.5 - gflops, "gflops": gflops, "full_budget": 1})


class _TrialStarts(tune.Callback):
    def __init__(self):
        self.specs = []

    def on_trial_start(self, iteration, trials, trial, **info):
        self.specs.append(trial.config["spec"])


def _search_with_instant_trials(tmp_path, raw, trainable=_instant_trial, callbacks=(), **options):
    """A real search (local Ray, SQLite MLflow) whose trials report at once; returns (outcome, the specs of
    the trials Ray started, the Optuna study). The search starts its own Ray and this shuts it down after, unless
    a Ray was already up (fixture `local_ray`): the search joins that one, and it stays up."""
    import sys

    import optuna
    import ray

    from search.run import _optuna_storage, run_search

    # Ray's workers cannot import this test module: send its stand-in trainable by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    starts = _TrialStarts()
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", empty_mlflow_store(tmp_path))
    own_ray = not ray.is_initialized()
    try:
        outcome = run_search(parse_job(raw), store=tmp_path / "store", say=lambda _: None,
                             trainable=trainable, callbacks=[starts, *callbacks], **options)
    finally:
        if own_ray:
            ray.shutdown()
        patch.undo()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    study = optuna.load_study(study_name=raw["name"],
                              storage=_optuna_storage(tmp_path / "store" / "optuna.journal"))
    return outcome, starts.specs, study


class _RayItRunsOn(tune.Callback):
    """In the search's driver: the GCS address of the Ray its trials run on."""

    def __init__(self):
        self.addresses = set()

    def on_trial_start(self, iteration, trials, trial, **info):
        self.addresses.add(ray.get_runtime_context().gcs_address)


def test_a_search_joins_the_cluster_that_RAY_ADDRESS_names(tmp_path, shapes, monkeypatch, ray_tmpdir):
    """On a cluster's head node RAY_ADDRESS is set. The search joins that cluster; it used to pass num_cpus to
    ray.init() there and die with Ray's ValueError, its parent run left RUNNING."""
    from ray.cluster_utils import Cluster

    # At the node's own address: ray.init() turns a 127.0.0.1 address into it (services.resolve_ip_for_localhost)
    # and then waits for a raylet registered there.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    address = cluster.address
    try:
        monkeypatch.setenv("RAY_ADDRESS", address)
        on = _RayItRunsOn()
        outcome, started, _ = _search_with_instant_trials(
            tmp_path, _raw(shapes, "on-a-cluster", search={"trials": 2}), callbacks=[on])
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert outcome.finished == 2 and len(started) == 2
    assert on.addresses == {address}


def test_a_search_starts_its_own_ray_beside_a_stale_address_file(tmp_path, shapes, ray_tmpdir):
    """`ray start --head` leaves its address in RAY_TMPDIR/ray/ray_current_cluster, and `ray stop` can leave it
    behind.
    ray.init() with no address would join that address; a search without --address or RAY_ADDRESS starts a
    local Ray of its own instead."""
    stale = f"127.0.0.1:{_closed_port()}"
    (ray_tmpdir / "ray").mkdir()
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(stale + "\n")
    on = _RayItRunsOn()
    outcome, started, _ = _search_with_instant_trials(tmp_path, _raw(shapes, "local", search={"trials": 1}),
                                                      callbacks=[on])
    assert outcome.finished == 1 and len(on.addresses) == 1
    assert stale not in on.addresses


def _closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: one the kernel handed out and took back."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_cluster_that_does_not_answer_is_one_line_and_creates_no_run(tmp_path, shapes, monkeypatch, capsys):
    import mlflow
    import yaml

    from search.cli import main

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(_raw(shapes, "no-cluster", search={"trials": 1})))
    uri = empty_mlflow_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    port = _closed_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    assert main(["search", str(job)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert err.startswith(f"effsearch: error: cannot reach the Ray cluster at 127.0.0.1:{port} (from RAY_ADDRESS): ")
    assert not ray.is_initialized()
    assert mlflow.MlflowClient(uri).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(uri).search_experiments()]) == []


@pytest.mark.parametrize("address, message", [
    ("http://127.0.0.1:8265", "RAY_ADDRESS http://127.0.0.1:8265 is a Ray Jobs API (dashboard) address"),
    ("head-node", "RAY_ADDRESS head-node: expected HOST:PORT, auto or local"),
    ("s3://bucket:1", "RAY_ADDRESS s3://bucket:1: expected HOST:PORT"),
    ("ray://head:10001", "RAY_ADDRESS ray://head:10001: Ray Client addresses are not supported"),
])
def test_a_ray_address_that_is_not_a_cluster_address_is_named(address, message, monkeypatch):
    from search.ray_runtime import RayUnreachable, cluster_address

    monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(RayUnreachable, match=re.escape(message)):
        cluster_address(None)


def test_address_flag_wins_over_RAY_ADDRESS_and_local_means_a_new_local_ray(monkeypatch):
    from search.ray_runtime import RayUnreachable, cluster_address

    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert cluster_address(None) is None
    closed = f"127.0.0.1:{_closed_port()}"
    with pytest.raises(RayUnreachable, match=re.escape(f"cannot reach the Ray cluster at {closed} (from --address)")):
        cluster_address(closed)
    monkeypatch.setenv("RAY_ADDRESS", "head-node")  # malformed: not looked at when --address is given
    with pytest.raises(RayUnreachable, match=re.escape(f"at {closed} (from --address)")):
        cluster_address(closed)
    monkeypatch.delenv("RAY_ADDRESS")
    assert cluster_address(None) is None


# The tests above need no Ray running (nothing may start one), a Ray of their own (a cluster, a stale address
# file, a search whose driver crashes with trials running) or run a search in another process. The searches below
# all run on one local Ray, fixture local_ray, which stays up until the module ends: keep such tests above it.


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the searches below, started as a search starts its own (search.ray_runtime.start_ray); each
    search joins it rather than starting and stopping one of its own (about 5 s each here)."""
    from search.ray_runtime import start_ray

    start_ray(None)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def searched(search_folder, one_batch, local_ray):
    raw = {
        "name": "search-test",
        "data": {"train": one_batch["train"], "val": one_batch["val"]},
        "search": {"space": "lite_cpu", "trials": 2, "max_concurrent_trials": 2, "seed": 1, "max_gflops": BUDGET},
        "train": {"epochs": 2, "batch_size": 8, "eval_every": 1},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
    }
    with searched_store(search_folder, raw) as (outcome, client):
        yield outcome, client, parse_job(raw)


def test_every_trial_is_a_child_run(searched):
    outcome, client, job = searched
    children = [run for run in _children(client, outcome) if run.data.tags[STATE_TAG] != INFEASIBLE]
    assert len(children) == job.search.trials
    # Readable names (the trial's number, phi, the network's size), and the sampler's own values as search.KEY.
    names = sorted(run.info.run_name for run in children)
    assert len(set(names)) == len(names), names
    for run in children:
        params = run.data.params
        phi = params["search.phi"]
        assert re.fullmatch(rf"t\d{{3}}-phi{float(phi):g}-r{params['image_size']}-w\d\.\d\dd\d\.\d\d-"
                            rf"f{params['fpn_channels']}x{params['fpn_repeats']}", run.info.run_name), run.info.run_name
        assert params["search.fpn_channels"] == params["fpn_channels"]
        assert run.info.run_name.startswith(f"t{int(run.data.tags['effsearch.optuna_number']):03d}-")
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["search.trials"] == "2"


def test_trained_trials_have_per_epoch_metrics_and_params(searched):
    outcome, client, job = searched
    trained = [r for r in _children(client, outcome) if r.data.tags[STATE_TAG] == COMPLETE]
    assert trained, "the seeded search should train at least one in-budget configuration"
    for run in trained:
        history = client.get_metric_history(run.info.run_id, "map")
        assert [m.step for m in history] == [1, 2]
        assert all(0.0 <= m.value <= 1.0 for m in history)
        assert 0 < run.data.metrics["gflops"] <= BUDGET
        assert run.data.metrics["params_m"] > 0 and "map50" in run.data.metrics
        # Raw and EMA weights are both scored; the better one is the trial's AP.
        assert run.data.metrics["map"] == max(run.data.metrics["map_raw"], run.data.metrics["map_ema"])
        assert run.data.params["backbone_family"] == "efficientnet_lite"
        assert run.data.tags[FULL_BUDGET_TAG] == "true"


def test_a_one_worker_trial_trains_in_its_tune_trial_with_tune_checkpoints(searched, search_folder):
    """No TorchTrainer for one worker: no Ray Train run folder, and each trial keeps its last two epochs as Tune
    checkpoints, from which its MLflow model was logged."""
    from search.trainable import CHECKPOINTS_KEPT

    outcome, client, job = searched
    trained = [r for r in _children(client, outcome) if r.data.tags[STATE_TAG] == COMPLETE]
    store = search_folder / "store" / "ray"
    assert not list(store.glob("train-*")), "a one-worker trial started a Ray Train run"
    checkpoints = sorted(store.glob("*/*/checkpoint_*"))
    assert len(checkpoints) == CHECKPOINTS_KEPT * len(trained), checkpoints
    assert all(run.data.tags.get(MODEL_URI_TAG) for run in trained)


def test_over_budget_proposals_never_become_trials(searched):
    """Seed 1's first proposal (0.072 GFLOPs) is over the budget: it is answered in the driver, so every
    trained child run is an in-budget configuration (the count is tested in test_an_over_budget_proposal...).
    The proposal is a run too, never trained: state infeasible, its cost, and the limit it broke."""
    outcome, client, job = searched
    children = _children(client, outcome)
    assert outcome.failed == 0 and all(r.info.status == "FINISHED" for r in children)
    trained = [r for r in children if r.data.tags[STATE_TAG] != INFEASIBLE]
    assert all(r.data.metrics["gflops"] <= BUDGET for r in trained)
    assert all(r.data.tags[STATE_TAG] == COMPLETE for r in trained)
    infeasible = [r for r in children if r.data.tags[STATE_TAG] == INFEASIBLE]
    assert infeasible and all(r.data.metrics["gflops"] > BUDGET and "loss" not in r.data.metrics for r in infeasible)
    assert all(r.data.tags["effsearch.reason"].startswith("over budget: ") for r in infeasible)


def test_frontier_is_tagged_and_attached(searched):
    outcome, client, job = searched
    points = complete_trials(client, outcome.experiment_id)
    front_ids = {p.run_id for p in compute_frontier(points)}
    assert front_ids == {p.run_id for p in outcome.frontier}
    for point in points:
        tag = client.get_run(point.run_id).data.tags[FRONTIER_TAG]
        assert tag == ("true" if point.run_id in front_ids else "false")
    artifacts = {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    assert {"frontier.csv", "frontier.html", "frontier.png"} <= artifacts


def test_promote_sets_production(searched):
    outcome, client, job = searched
    first = promote(client, job.name, max_gflops=BUDGET)
    assert str(client.get_model_version_by_alias(job.name, PRODUCTION).version) == first.version
    assert first.uri == f"models:/{job.name}@{PRODUCTION}"
    assert first.run_id in {p.run_id for p in outcome.frontier}


def test_promoted_model_loads_and_runs(searched, tmp_path):
    import mlflow.pytorch
    import torch

    outcome, client, job = searched
    promotion = promote(client, job.name, max_gflops=BUDGET)
    model = mlflow.pytorch.load_model(promotion.uri, dst_path=str(tmp_path))
    size = int(client.get_run(promotion.run_id).data.params["image_size"])
    classes, boxes = model(torch.zeros(2, 3, size, size))
    assert classes[0].shape[0] == 2 and boxes[0].shape[1] == 9 * 4


def test_promote_refuses_an_impossible_budget(searched):
    from search.frontier import FrontierError

    outcome, client, job = searched
    with pytest.raises(FrontierError, match="fits within 0.001 GFLOPs; the cheapest frontier model needs"):
        promote(client, job.name, max_gflops=0.001)


def _failing_cli_search(tmp_path, raw, monkeypatch, capfd):
    """`effsearch search JOB` on the raw job, in tmp_path with an empty store; asserts it exits 1 and returns
    (store uri, stdout, stderr), read from the file descriptors: Ray's log handler writes to the stderr it found."""
    import yaml

    from search.cli import main

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    uri = empty_mlflow_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    capfd.readouterr()
    assert main(["search", str(job)]) == 1
    out, err = capfd.readouterr()
    return uri, out, err


def test_a_trial_whose_loss_diverges_fails_alone_and_the_search_goes_on(tmp_path, shapes, monkeypatch, capfd,
                                                                        local_ray):
    """...and a search in which no trial finished says so: the CLI exits 1 with one line, each failure is one
    progress line (no Ray traceback on the console), the traceback is the run's error.txt, and the parent run
    is FAILED with the reason."""
    from mlflow.tracking import MlflowClient

    raw = {
        "name": "diverging",
        "data": {"train": shapes["train"], "val": shapes["val"]},
        # One trial at a time: the second starts only after the first has failed.
        "search": {"space": "lite_cpu", "trials": 2, "max_concurrent_trials": 1, "seed": 0},
        "train": {"epochs": 1, "batch_size": 8, "lr": 1.0e+12, "warmup_epochs": 0},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "max_failures": 0},
    }
    uri, out, err = _failing_cli_search(tmp_path, raw, monkeypatch, capfd)
    reason = re.compile(r"loss became non-finite at epoch 1 step \d+")
    assert "Traceback" not in out + err and "Trials did not complete" not in out + err, out + err
    failures = [line for line in out.splitlines() if " did not train: " in line]
    assert len(failures) == 2 and all(reason.search(line) and "error.txt" in line for line in failures), out
    assert "(empty: no trial of this experiment has finished training)" in out
    assert err.strip().count("\n") == 0 and err.startswith("effsearch: error: no trial of 2 finished training "
                                                            "(first failure: trainers.loop.NonFiniteLoss: "), err
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("diverging")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`effsearch.kind` = 'search'")
    assert parent.info.status == "FAILED"
    assert parent.data.tags[REASON_TAG] == err.strip().removeprefix("effsearch: error: ")
    children = client.search_runs([experiment.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
    assert len(children) == 2
    for run in children:
        assert run.info.status == "FAILED" and run.data.tags[STATE_TAG] == FAILED
        assert reason.search(run.data.tags["effsearch.error"])
        traceback = Path(client.download_artifacts(run.info.run_id, "error.txt", str(tmp_path))).read_text()
        assert "in _raise_if_nonfinite" in traceback and reason.search(traceback)  # the frames, where it failed


def test_a_fault_in_the_data_that_a_trial_meets_stops_the_search(tmp_path, monkeypatch, capfd, local_ray):
    """With data.check: headers, a truncated image passes the check, and the first trial to decode it fails. The
    data is every trial's, so the search starts no other: the CLI exits 1 with one line naming the image, the
    trial's run and the parent are FAILED with it, and nothing is left RUNNING. (A diverging loss, the test above,
    is one configuration's, and the search goes on after it.)"""
    import json

    from mlflow.tracking import MlflowClient

    from trainers.shapes import make_shapes

    data = make_shapes(tmp_path / "data", train_images=8, val_images=4, seed=3)
    images = json.loads(Path(data["train"]["annotations"]).read_text())["images"]
    broken = Path(data["train"]["images"]) / images[3]["file_name"]
    blob = broken.read_bytes()
    broken.write_bytes(blob[: len(blob) // 2])
    raw = {
        "name": "broken-image",
        "data": {"train": data["train"], "val": data["val"], "check": "headers"},
        "search": {"space": "lite_cpu", "trials": 3, "max_concurrent_trials": 1, "seed": 0},
        "train": {"epochs": 1, "batch_size": 8},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},  # max_failures 1: Tune retries it once
    }
    uri, out, err = _failing_cli_search(tmp_path, raw, monkeypatch, capfd)
    assert "Traceback" not in out + err, out + err
    assert err.strip().count("\n") == 0, err
    assert err.startswith("effsearch: error: the search stopped at a fault in the data, which every trial would "
                          f"meet: {broken}: cannot read image id {images[3]['id']}: "), err
    assert err.strip().endswith("(data.check: full finds every such image before a search starts)"), err
    assert len([line for line in out.splitlines() if " did not train: " in line]) == 1, out
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("broken-image")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`effsearch.kind` = 'search'")
    assert parent.info.status == "FAILED"
    assert parent.data.tags[REASON_TAG] == err.strip().removeprefix("effsearch: error: ")
    (run,) = client.search_runs([experiment.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
    assert run.info.status == "FAILED" and run.data.tags[STATE_TAG] == FAILED
    assert str(broken) in run.data.tags[REASON_TAG]


_MULTI_LINE = ("Expected to have finished reduction in the prior iteration before starting a new one.\n"
               "Parameter indices which did not receive grad for rank 0: 92 93\n"
               " In addition, you can set the environment variable TORCH_DISTRIBUTED_DEBUG to either INFO or DETAIL")


def _multi_line_failure(config, *, setup):
    """Fails as torch's DDP does, with a message of three lines whose last says nothing of what happened."""
    raise RuntimeError(_MULTI_LINE)


def test_a_failed_trials_reason_is_the_line_that_says_what_happened(tmp_path, shapes, local_ray):
    """The run's reason and the search's first error are the line that begins the exception, not its message's
    last line."""
    from mlflow.tracking import MlflowClient

    raw = _raw(shapes, "multi-line", search={"trials": 1}, train={"epochs": 1},
               resources={"workers_per_trial": 1, "cpus_per_worker": 1, "max_failures": 0})
    outcome, _, _ = _search_with_instant_trials(tmp_path, raw, trainable=_multi_line_failure)
    expected = "RuntimeError: Expected to have finished reduction in the prior iteration before starting a new one."
    assert outcome.failed == 1 and outcome.first_error == expected
    (run,) = _children(MlflowClient(empty_mlflow_store(tmp_path)), outcome)
    assert run.data.tags[REASON_TAG] == expected


def test_the_error_line_of_a_multi_worker_trial_is_its_workers():
    """A TorchTrainer's error quotes its workers' after Train's own; the worker's is the one that says what
    happened (the text as Ray 2.60 writes a 2-worker trial's error file, shortened)."""
    from search.trial_runs import error_line

    text = ("Failure # 1 (occurred at 2026-12-07_05-28-28)\n"
            "  File \"/work/main/search/trainable.py\", line 173, in fit\n    trainer.fit()\n"
            "ray.train.WorkerGroupError: Training failed due to worker errors:\n[Rank 0,1 Error Snippet]:\n"
            "  File \"/work/main/trainers/loop.py\", line 140, in fit\n"
            f"RuntimeError: {_MULTI_LINE}\n")
    assert error_line(text) == "RuntimeError: " + _MULTI_LINE.splitlines()[0]
    assert error_line("trainers.loop.OutOfMemory: out of memory at batch_size 16\n") == \
        "trainers.loop.OutOfMemory: out of memory at batch_size 16"
    assert error_line("no exception here\nlast words\n") == "last words" and error_line("") == ""


def test_a_composed_bifpn_and_training_search_trains_each_trial_with_its_own_settings(tmp_path, local_ray):
    """[bifpn, training] on real Ray, two real trials of 2 epochs. Each trains at its own proposed batch size and
    learning rate, not the job's: the 16 training images make 1 batch of 12 (12 images; the job's batch of 8 would
    take all 16) or 1 of 16, and with no warmup the cosine schedule is at half its peak after epoch 1 of 2, the
    peak being lr scaled by sqrt(batch / 16) for AdamW. The searched settings are logged as train.* params beside
    the spec."""
    import math

    from trainers.shapes import make_shapes

    data = make_shapes(tmp_path / "shapes", train_images=16, val_images=4, seed=3)  # the largest batch, once
    raw = _raw(data, "composed", search={
        "space": ["bifpn", "training"], "trials": 2, "scheduler": "fifo", "seed": 0,
        "bounds": {"bifpn": {"preset": "cpu", "image_size": [128, 160]},
                   "training": {"batch_size": [12, 16], "warmup_epochs": [0, 0]}},
        "enqueue": [{"image_size": 128, "fpn_channels": 24, "fpn_repeats": 1, "head_repeats": 1, "fusion": "sum",
                     "lr": 0.004, "batch_size": 12},
                    {"image_size": 128, "fpn_channels": 32, "fpn_repeats": 1, "head_repeats": 1, "fusion": "sum",
                     "lr": 0.02, "batch_size": 16, "focal_gamma": 2.0}]},
        train={"epochs": 2, "lr": 0.5, "batch_size": 8}, resources={"cpus_per_worker": 1})
    with searched_store(tmp_path, raw) as (outcome, client):
        assert outcome.finished == 2 and outcome.failed == 0
        runs = sorted(_children(client, outcome), key=lambda run: float(run.data.params["train.lr"]))
        assert [(float(r.data.params["train.lr"]), int(r.data.params["train.batch_size"])) for r in runs] == \
            [(0.004, 12), (0.02, 16)]
        assert float(runs[1].data.params["focal_gamma"]) == 2.0
        for run, lr, batch in zip(runs, (0.004, 0.02), (12, 16)):
            images = client.get_metric_history(run.info.run_id, "train_images")
            assert [m.value for m in images] == [batch, batch]
            (first, _) = sorted(client.get_metric_history(run.info.run_id, "lr"), key=lambda m: m.step)
            assert first.value == pytest.approx(0.5 * lr * math.sqrt(batch / 16), rel=1e-6)


def test_a_search_with_every_train_setting_at_its_default(tmp_path, local_ray):
    """A new user keeps the README's defaults: the compound space in its GPU-sized bounds, the default sampler
    and stopper, and every train setting (eval_every 2, EMA, jitter, amp auto...). Only phi is held at 0
    (EfficientDet-D0's size): D3 would take half an hour. The data is one default batch (16 images) and one image
    to score (4 boxes): at 512 px each image costs, and the data is not among the defaults."""
    from search.job import SearchConfig
    from trainers.recipe import TrainConfig
    from trainers.shapes import make_shapes

    small = make_shapes(tmp_path / "shapes", train_images=TrainConfig().batch_size, val_images=1, seed=3)
    raw = {"name": "defaults", "data": {"train": small["train"], "val": small["val"]},
           "search": {"trials": 1, "fixed": {"phi": 0}}}
    job = parse_job(raw)
    assert job.train == TrainConfig() and job.search.space == "compound" and job.search.bounds == {}
    assert replace(job.search, trials=SearchConfig.trials, fixed={}) == SearchConfig()
    with searched_store(tmp_path, raw) as (outcome, client):
        (run,) = _children(client, outcome)
        assert outcome.finished == 1 and run.info.status == "FINISHED"
        assert client.get_run(outcome.parent_run_id).info.status == "FINISHED"
        # Scored every 2nd epoch, and the series holds only the scored epochs.
        epochs = TrainConfig().epochs
        assert [m.step for m in client.get_metric_history(run.info.run_id, "map")] == list(range(2, epochs + 1, 2))
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, epochs + 1))
        assert run.data.tags[FULL_BUDGET_TAG] == "true"


def test_a_search_whose_budget_nothing_meets_exits_1_with_one_line(tmp_path, shapes, monkeypatch, capsys,
                                                                  local_ray):
    import yaml

    from search.cli import main

    job = tmp_path / "job.yaml"
    # phi held at 0, where lite_cpu's cheapest configuration lies: 9 configurations are left, and the search ends
    # once each has been proposed and turned away (the driver counts each one's FLOPs once, about 0.5 s here).
    job.write_text(yaml.safe_dump(_raw(shapes, "nothing-fits", search={"trials": 2, "max_gflops": 0.001,
                                                                        "fixed": {"phi": 0.0}})))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", empty_mlflow_store(tmp_path))
    capsys.readouterr()  # only the command's own output: the first store of a session logs its creation
    assert main(["search", str(job)]) == 1  # on the module's Ray (fixture local_ray), which stays up
    assert ray.is_initialized()
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    # Nothing was trained, so nothing was "already trained", and fewer trials would not help either.
    assert err == ("effsearch: error: no trial started: all of the space's parameter sets (9) were over the budget "
                   "(search.max_gflops 0.001; the cheapest needs 0.045 GFLOPs): raise the budget or widen the space")
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name("nothing-fits")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`effsearch.kind` = 'search'")
    assert parent.info.status == "FAILED" and parent.data.tags[REASON_TAG] == err.removeprefix("effsearch: error: ")


def test_an_over_budget_proposal_never_starts_a_trial(tmp_path, shapes, local_ray):
    """A budget of 0.063 GFLOPs rules out 15 of lite_cpu's 27 configurations. Every trial Ray starts is within
    it, all 8 requested trials train, and Optuna holds each turned-away proposal as PRUNED and infeasible."""
    import optuna

    from search.searcher import CostCounter
    from search.states import INFEASIBLE

    raw = _raw(shapes, "budget", search={"trials": 8, "max_concurrent_trials": 2, "max_gflops": 0.063},
               train={"epochs": 1})
    outcome, started, study = _search_with_instant_trials(tmp_path, raw)
    counter = CostCounter(3)
    assert len(started) == 8 and outcome.finished == 8
    assert all(counter(spec).gflops <= 0.063 for spec in started)
    infeasible = [t for t in study.trials if t.user_attrs.get(STATE_TAG) == INFEASIBLE]
    assert infeasible and all(t.state == optuna.trial.TrialState.PRUNED for t in infeasible)
    assert all(t.user_attrs["gflops"] > 0.063 for t in infeasible)
    trained = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
               and REPEATS_ATTR not in t.user_attrs]  # repeats are told the results of these
    assert len(trained) == 8
    first, second = outcome.feasible_share
    print(f"feasible share: first half {first:.2f}, second half {second:.2f}, {len(infeasible)} turned away")


def test_a_parameter_budget_is_a_second_constraint_and_no_trial_over_it_starts(tmp_path, shapes, local_ray):
    """max_params_m 0.72 rules out 15 of lite_cpu's 27 configurations (those at phi 0.5 and 1 with wide BiFPNs);
    max_gflops 0.1 rules out 4 more costly ones. No trial Ray starts is over either limit, and each turned-away
    proposal carries both constraints, so the sampler sees which limit it broke."""
    import optuna

    from search.continuation import _CONSTRAINTS_PREFIX
    from search.searcher import CostCounter
    from search.states import INFEASIBLE

    raw = _raw(shapes, "params-budget", search={"trials": 5, "max_params_m": 0.72, "max_gflops": 0.1},
               train={"epochs": 1})
    outcome, started, study = _search_with_instant_trials(tmp_path, raw)
    counter = CostCounter(3)
    assert len(started) == 5 and outcome.finished == 5
    assert all(counter(spec).params_m <= 0.72 and counter(spec).gflops <= 0.1 for spec in started)
    infeasible = [t for t in study.trials if t.user_attrs.get(STATE_TAG) == INFEASIBLE]
    assert infeasible and all(t.state == optuna.trial.TrialState.PRUNED for t in infeasible)
    for trial in study.trials:
        over = [trial.system_attrs[f"{_CONSTRAINTS_PREFIX}:{name}"]
                for name in ("params_m_over_budget", "gflops_over_budget")]
        assert (max(over) > 0) == (trial in infeasible)
        assert over[0] == pytest.approx(trial.user_attrs["params_m"] - 0.72)


def test_a_repeated_proposal_is_answered_with_the_earlier_result_not_trained_again(tmp_path, shapes, local_ray):
    """search.fixed leaves 3 configurations (fpn_repeats 1..3) and the job asks for 4 trials: each
    configuration trains once; proposals that repeat one are told to Optuna with its results, and when
    nothing new is left the search ends and says why."""
    import optuna

    raw = _raw(shapes, "repeats", search={"trials": 4, "fixed": {"phi": 0.0, "fpn_channels": 32}},
               train={"epochs": 1})
    outcome, started, study = _search_with_instant_trials(tmp_path, raw)
    assert sorted(spec["fpn_repeats"] for spec in started) == [1, 2, 3]
    assert outcome.finished == 3 and "already trained" in outcome.first_error
    # With no GFLOPs budget the driver builds each proposal but does not run it to count FLOPs (the trial
    # reports its GFLOPs): the repeats above were found by the built network alone.
    assert not any("gflops" in t.user_attrs for t in study.trials)
    assert all("params_m" in t.user_attrs for t in study.trials)
    repeats = [t for t in study.trials if REPEATS_ATTR in t.user_attrs]
    assert repeats and all(t.state == optuna.trial.TrialState.COMPLETE for t in repeats)
    for trial in repeats:
        original = study.trials[trial.user_attrs[REPEATS_ATTR]]
        assert trial.params == original.params and trial.values == original.values


def _slow_trial(config, *, setup):
    """As _instant_trial, after 3 s: long enough that the next proposal comes while it trains."""
    import time

    time.sleep(3)
    _instant_trial(config, setup=setup)


def test_a_proposal_of_a_configuration_still_training_does_not_start_a_second_trial(tmp_path, shapes, local_ray):
    """Two enqueued points that build the same network (beta 1.1 and 1.104 at phi 0.5, as in the test above), 2
    trials at a time. The second comes while the first trains: it is told PRUNED (no values yet) and the sampler
    is asked again, so the 2 trials train 2 networks. Before, the network trained twice side by side."""
    import optuna

    from search.searcher import REPEATS_RUNNING_ATTR, CostCounter

    point = {"phi": 0.5, "alpha": 1.2, "fpn_width_base": 40, "fpn_width_growth": 1.35, "fpn_depth_base": 2,
             "fpn_depth_slope": 1.0, "head_depth_base": 2}
    raw = _raw(shapes, "running-repeat", search={
        "space": "compound", "bounds": {"preset": "cpu"}, "trials": 2, "max_concurrent_trials": 2,
        "scheduler": "fifo", "enqueue": [{**point, "beta": 1.1}, {**point, "beta": 1.104}]},
        train={"epochs": 1}, resources={"cpus_per_worker": 1})  # two trials fit side by side on 2 CPUs
    outcome, started, study = _search_with_instant_trials(tmp_path, raw, trainable=_slow_trial)
    assert outcome.finished == 2 and len(started) == 2
    # Ray starts the two trials' actors side by side, in either order: the first point is one of them.
    assert 0.524 in {spec["backbone_width"] for spec in started}
    first = study.trials[0]
    assert first.params["beta"] == 1.1 and first.state == optuna.trial.TrialState.COMPLETE
    architectures = {CostCounter(3)(spec).architecture for spec in started}
    assert len(architectures) == 2  # two networks, not two specs that round to one
    waiting = study.trials[1]
    assert waiting.params["beta"] == 1.104 and waiting.state == optuna.trial.TrialState.PRUNED
    assert waiting.user_attrs[REPEATS_RUNNING_ATTR] == 0 and not waiting.values


def test_when_only_a_training_configuration_is_left_the_search_waits_for_it(tmp_path, shapes, local_ray):
    """search.fixed leaves one configuration and the job asks for 2 trials, 2 at a time: the searcher proposes
    nothing while the first trial trains (Tune asks again and again meanwhile; the study does not fill up), then
    finds the configuration trained and ends the search with one trial and one told repeat."""
    from search.searcher import REPEATS_ATTR

    raw = _raw(shapes, "running-wait", search={
        "trials": 2, "max_concurrent_trials": 2, "fixed": {"phi": 0.0, "fpn_channels": 32, "fpn_repeats": 1}},
        train={"epochs": 1}, resources={"cpus_per_worker": 1})
    outcome, started, study = _search_with_instant_trials(tmp_path, raw, trainable=_slow_trial)
    assert len(started) == 1 and outcome.finished == 1
    assert outcome.first_error.startswith("all of the space's parameter sets (1) were already trained")
    assert len(study.trials) == 2 and study.trials[1].user_attrs[REPEATS_ATTR] == 0


def test_the_parameter_sets_of_a_space_are_counted_from_its_distributions():
    """The count that ends a finite search: categorical choices, stepped ints and floats multiply; a held
    parameter counts once; a float without a step, or a parameter proposed with two distributions, is no count."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from search.searcher import parameter_sets

    seen = {"phi": {CategoricalDistribution((0, 0.5, 1))}, "repeats": {IntDistribution(1, 9, step=2)},
            "base": {FloatDistribution(0.0, 1.0, step=0.25)}}
    assert parameter_sets(seen, {}) == 3 * 5 * 5
    assert parameter_sets(seen, {"phi": 0}) == 5 * 5
    assert parameter_sets({**seen, "lr": {FloatDistribution(1e-4, 1e-2, log=True)}}, {}) is None
    assert parameter_sets({**seen, "lr": {FloatDistribution(1e-4, 1e-2, log=True)}}, {"lr": 1e-3}) == 75
    assert parameter_sets({**seen, "phi": {CategoricalDistribution((0, 1)), CategoricalDistribution((0, 2))}},
                          {}) is None


def test_a_later_search_of_the_job_reuses_a_result_only_under_the_same_data_and_settings(tmp_path, shapes, local_ray):
    """search.fixed leaves one configuration. A second search of the same job finds it trained and starts no
    trial; after the job's epochs change, the earlier result is not this search's measurement, so it trains again
    (and the study keeps both, each tagged with what it trained under)."""
    import optuna

    from search.searcher import TRAINED_UNDER_ATTR

    raw = _raw(shapes, "lineage", search={"trials": 1, "fixed": {"phi": 0.0, "fpn_channels": 32, "fpn_repeats": 1}},
               train={"epochs": 1})
    _, started, _ = _search_with_instant_trials(tmp_path, raw)
    assert len(started) == 1
    outcome, started, _ = _search_with_instant_trials(tmp_path, raw)
    assert started == [] and outcome.finished == 0 and "already trained" in outcome.first_error
    outcome, started, study = _search_with_instant_trials(tmp_path, {**raw, "train": {"epochs": 2}})
    assert len(started) == 1 and outcome.finished == 1
    trained = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
               and REPEATS_ATTR not in t.user_attrs]
    assert len(trained) == 2 and trained[0].params == trained[1].params
    assert trained[0].user_attrs[TRAINED_UNDER_ATTR] != trained[1].user_attrs[TRAINED_UNDER_ATTR]


def test_a_proposal_that_builds_a_trained_network_is_a_repeat(tmp_path, shapes, local_ray):
    """beta 1.1 and 1.104 at phi 0.5 give backbone widths 0.524 and 0.525, which round to the same channels
    (tests/test_model.py): the second is told the first's results and does not train; a third proposal does."""
    import optuna

    point = {"phi": 0.5, "alpha": 1.2, "fpn_width_base": 40, "fpn_width_growth": 1.35, "fpn_depth_base": 2,
             "fpn_depth_slope": 1.0, "head_depth_base": 2}
    raw = _raw(shapes, "same-network", search={
        "space": "compound", "bounds": {"preset": "cpu"}, "trials": 2, "scheduler": "fifo", "max_concurrent_trials": 1,
        "enqueue": [{**point, "beta": 1.1}, {**point, "beta": 1.104}]}, train={"epochs": 1})
    # One trial at a time (as the cluster holds on 2 cores, said here for larger machines): trials start in the
    # order they were proposed, and the second proposal comes after the first trial finished.
    outcome, started, study = _search_with_instant_trials(tmp_path, raw)
    assert outcome.finished == 2 and len(started) == 2
    assert started[0]["backbone_width"] == 0.524
    second = study.trials[1]
    assert second.params["beta"] == 1.104 and second.user_attrs[REPEATS_ATTR] == 0
    assert second.state == optuna.trial.TrialState.COMPLETE and second.values == study.trials[0].values


def test_enqueued_points_are_the_first_trials(tmp_path, shapes, local_ray):
    """search.enqueue: the paper's rule at two phi steps, then a partial point; the sampler proposes after them."""
    raw = _raw(shapes, "enqueue", search={
        "space": "compound", "bounds": {"preset": "cpu"}, "trials": 4, "scheduler": "fifo", "max_concurrent_trials": 1,
        "enqueue": ["rule:0", "rule:1", {"phi": 0.5, "fpn_width_base": 24, "fpn_depth_base": 1}]},
        train={"epochs": 1})
    outcome, started, study = _search_with_instant_trials(tmp_path, raw)  # one at a time: started in proposal order
    assert outcome.finished == 4
    sizes = [(s["image_size"], s["fpn_channels"], s["fpn_repeats"]) for s in started]
    assert sizes[:2] == [(160, 48, 2), (192, 64, 3)]  # the rule in the CPU bounds (tests/test_spaces.py)
    assert study.trials[2].params["fpn_width_base"] == 24 and study.trials[2].params["phi"] == 0.5
    assert started[2]["fpn_repeats"] == round(1 + 0.5 * study.trials[2].params["fpn_depth_slope"])
    # Tune's CSV and JSON results are kept in each trial's folder; its TensorBoard logger, whose writer thread
    # hung the driver at exit after a second Ctrl-C, is not added (search/ray_runtime.py).
    trial_files = [path.name for path in (tmp_path / "store" / "ray").glob("*/*/*") if path.is_file()]
    assert trial_files.count("result.json") == trial_files.count("progress.csv") == 4
    assert not [name for name in trial_files if name.startswith("events.out.tfevents")]


def _curves_table(path):
    """Learning curves of the rule's 5 configurations of the CPU compound space, written as record_curves.py writes
    them. Costlier configurations learn faster and end higher (AP 0.20 to 0.60); a trial costs 10 s an epoch per
    0.05 GFLOPs. The committed table is recorded by training; this one keeps the test apart from it."""
    import math

    import optuna

    from search.replay import MATCHED, load_curves, write_curves
    from search.searcher import CostCounter
    from spaces import enqueued_params, make_space

    space, counter = make_space("compound", {"preset": "cpu"}), CostCounter(3)
    rows = []
    for number, point in enumerate(enqueued_params("compound", [f"rule:{p}" for p in (0, .25, .5, .75, 1)],
                                                   {"preset": "cpu"})):
        spec = space(optuna.trial.FixedTrial(point))["spec"]
        cost, final = counter(spec).gflops, 0.2 + 0.1 * number
        for epoch in range(1, 7):
            rows.append({"config": f"c{number}", **{k: spec[k] for k in MATCHED}, "gflops": cost, "params_m": 0.5,
                         "epoch": epoch, "map": final * (1 - math.exp(-epoch * (1 + number) / 4)),
                         "epoch_s": 200 * cost, "eval_s": 2.0})
    write_curves(path, rows)
    return load_curves(path)


def test_the_replay_charges_the_median_of_the_timing_rounds_and_refuses_a_table_that_misses_a_configuration(tmp_path):
    """With curve_timings.csv beside the curves, a configuration is charged the median over its rounds of one
    epoch's training and evaluation seconds, not its fastest recorded epoch; without it, the fastest recorded
    epoch. A timings file that leaves out a recorded configuration is refused, naming it."""
    from search.replay import load_curves, write_timings

    curves = _curves_table(tmp_path / "curves.csv")  # c0..c4, recorded epoch_s 200 x GFLOPs, eval_s 2.0
    assert curves[0].charged_s == curves[0].recorded_charge_s == (200 * curves[0].gflops, 2.0)
    rounds = {"c0": [(30.0, 5.0), (10.0, 3.0), (20.0, 4.0)], "c1": [(7.0, 1.0), (9.0, 9.0), (8.0, 2.0)],
              "c2": [(1.0, 1.0)], "c3": [(2.0, 1.0)], "c4": [(3.0, 1.0)]}

    def write(table):
        write_timings(tmp_path / "curve_timings.csv",
                      [{"config": config, "round": number, "epoch_s": epoch_s, "eval_s": eval_s,
                        "first_epoch_s": epoch_s + 5}
                       for config, runs in table.items() for number, (epoch_s, eval_s) in enumerate(runs)])

    write(rounds)
    timed = {c.config: c for c in load_curves(tmp_path / "curves.csv")}
    assert timed["c0"].charged_s == (20.0, 4.0) and timed["c1"].charged_s == (8.0, 2.0)
    assert timed["c0"].recorded_charge_s == curves[0].recorded_charge_s
    write({k: v for k, v in rounds.items() if k != "c3"})
    with pytest.raises(ValueError, match="no timing of c3"):
        load_curves(tmp_path / "curves.csv")


def test_the_pareto_stopper_prunes_on_replayed_curves_and_pruned_trials_stay_off_the_frontier(tmp_path, shapes,
                                                                                                 monkeypatch,
                                                                                                 local_ray):
    """12 trials of the CPU compound space replay learning curves under the Pareto stopper, rungs at epochs 1 and
    3 of 6. Every trial it stops is PRUNED in Optuna with no values, tagged pruned in MLflow, and absent from the
    frontier; the rest are complete."""
    import optuna
    from mlflow.tracking import MlflowClient

    import search.trial_runs

    # Replayed trials finish within seconds of each other: without the redraw's rate limit, every one redraws.
    monkeypatch.setattr(search.trial_runs, "FRONTIER_REFRESH_S", 0.0)

    from search.replay import ReplayTrainable
    from search.states import PRUNED

    raw = _raw(shapes, "stopper", search={
        "space": "compound", "bounds": {"preset": "cpu"}, "trials": 12, "sampler": "random", "scheduler": "pareto",
        "grace_period": 1, "reduction_factor": 3, "max_concurrent_trials": 1}, train={"epochs": 6})
    curves = _curves_table(tmp_path / "curves.csv")
    outcome, started, study = _search_with_instant_trials(tmp_path, raw, ReplayTrainable(curves))
    assert len(started) == 12
    pruned = [t for t in study.trials if t.user_attrs.get(STATE_TAG) == PRUNED]
    assert pruned, "the stopper stopped no trial"
    assert all(t.state == optuna.trial.TrialState.PRUNED and t.values is None for t in pruned)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
                and REPEATS_ATTR not in t.user_attrs]
    assert len(pruned) + len(complete) == 12
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([outcome.experiment_id], f"tags.`{PARENT_TAG}` = '{outcome.parent_run_id}'")
    states = {run.info.run_id: run.data.tags[STATE_TAG] for run in runs}
    assert sorted(states.values()) == sorted([PRUNED] * len(pruned) + [COMPLETE] * len(complete))
    assert outcome.frontier and all(states[point.run_id] == COMPLETE for point in outcome.frontier)
    # The frontier was refreshed as each trial completed, not only at the end: one hypervolume per complete trial
    # (and the final one again), never falling, since each adds a point and the reference only moves outwards.
    history = [m.value for m in sorted(client.get_metric_history(outcome.parent_run_id, "hypervolume"),
                                       key=lambda m: (m.step, m.timestamp))]
    assert len(history) == len(complete) + 1 and history == sorted(history) and history[-1] > 0
    print(f"stopped {len(pruned)} of 12 trials early")
