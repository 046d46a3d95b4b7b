"""Continuing searches: --resume after the driver was SIGKILLed, and --warm-start from another job's study."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from search.continuation import WARM_START_ATTR, warm_start
from search.job import JobError
from search.searcher import Budget
from search.states import STATE_TAG
from search.tracking import PARENT_TAG, TRIAL_ID_TAG
from conftest import empty_mlflow_store

REPO = Path(__file__).resolve().parents[1]


def _journal(path):
    from search.run import _optuna_storage

    return _optuna_storage(path)


def _study_with(storage, name, points, distributions):
    study = optuna.create_study(study_name=name, storage=storage, directions=["maximize", "minimize"])
    for params, values in points:
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, values=values,
                                                  user_attrs={"gflops": values[1], "params_m": 10 * values[1]}))
    return study


def test_warm_start_copies_complete_trials_once_and_refuses_another_space(tmp_path):
    from search.continuation import _CONSTRAINTS_PREFIX

    gflops_key, params_key = f"{_CONSTRAINTS_PREFIX}:gflops_over_budget", f"{_CONSTRAINTS_PREFIX}:params_m_over_budget"
    storage = _journal(tmp_path / "optuna.journal")
    space = {"phi": optuna.distributions.FloatDistribution(0, 1, step=0.5)}
    _study_with(storage, "first", [({"phi": 0.0}, [0.2, 0.05]), ({"phi": 1.0}, [0.4, 0.1])], space)
    assert warm_start(storage, "first", "second", ["max", "min"], space, Budget(max_gflops=0.08)) == 2
    assert warm_start(storage, "first", "second", ["max", "min"], space, Budget(max_gflops=0.08)) == 0  # once only
    second = optuna.load_study(study_name="second", storage=storage)
    assert [t.values for t in second.trials] == [[0.2, 0.05], [0.4, 0.1]]
    assert [t.user_attrs[WARM_START_ATTR] for t in second.trials] == ["first#0", "first#1"]
    # Under the new budget, the copies carry their constraint as the search's own trials do: 0.1 is over 0.08.
    assert [t.system_attrs[gflops_key] for t in second.trials] == pytest.approx([-0.03, 0.02])
    # A parameter limit is a second constraint, from each trial's recorded parameter count.
    assert warm_start(storage, "first", "fourth", ["max", "min"], space, Budget(0.08, max_params_m=0.6)) == 2
    fourth = optuna.load_study(study_name="fourth", storage=storage)
    assert [t.system_attrs[params_key] for t in fourth.trials] == pytest.approx([-0.1, 0.4])
    assert [t.system_attrs[gflops_key] for t in fourth.trials] == pytest.approx([-0.03, 0.02])
    other = {"phi": optuna.distributions.FloatDistribution(0, 2, step=0.5)}
    with pytest.raises(JobError, match=r"--warm-start first: its trials searched phi over .* needs the same space"):
        warm_start(storage, "first", "third", ["max", "min"], other, Budget())
    with pytest.raises(JobError, match=r"--warm-start nope: no search of that name in this store \(known: first, "
                                       r"second, fourth\)"):
        warm_start(storage, "nope", "third", ["max", "min"], space, Budget())


def test_a_warm_started_search_begins_with_the_first_searchs_trials_and_does_not_propose_at_random(tmp_path,
                                                                                                     shapes):
    """A random search of 8 instant trials (AP falls as GFLOPs rise), then a TPE search of 4 warm-started from
    it: its study begins with the first's 8 complete trials, and TPE, past its 2 random start-up trials already,
    proposes from the start toward the cheap, accurate corner the first search found, and trains none of the
    first search's configurations again."""
    import ray
    from test_search import _raw, _search_with_instant_trials

    from search.ray_runtime import start_ray
    from search.searcher import CostCounter

    first_raw = _raw(shapes, "cold", search={"space": "compound", "bounds": {"preset": "cpu"}, "trials": 8,
                                             "sampler": "random", "scheduler": "fifo"}, train={"epochs": 1})
    raw = _raw(shapes, "warm", search={"space": "compound", "bounds": {"preset": "cpu"}, "trials": 4,
                                       "scheduler": "fifo", "max_concurrent_trials": 1}, train={"epochs": 1})
    start_ray(None)  # one local Ray, as a search starts it, for both searches: each joins it
    try:
        _, first_specs, first = _search_with_instant_trials(tmp_path, first_raw)
        outcome, specs, study = _search_with_instant_trials(tmp_path, raw, warm_start_from="cold")
    finally:
        ray.shutdown()
    copied = [t for t in study.trials if WARM_START_ATTR in t.user_attrs]
    assert [t.number for t in copied] == list(range(8))  # the study begins with them
    assert sorted(map(tuple, (t.values for t in copied))) == sorted(map(tuple, (t.values for t in first.trials)))
    assert outcome.finished == 4 and len(specs) == 4
    # A proposal equal to a copied configuration reuses its results rather than training it again.
    assert not [spec for spec in specs if spec in first_specs]
    counter = CostCounter(3)
    first_costs = sorted(counter(s).gflops for s in first_specs)
    warm_costs = [counter(s).gflops for s in specs]
    print(f"first search GFLOPs {first_costs}; warm-started proposals {warm_costs}")
    assert sum(warm_costs) / 4 < sum(first_costs) / 8


def _children(client, experiment_id, parent_id):
    return client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'")


def _descendants(pid):
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _wait_for_tune_snapshot(folder, after: float, timeout: float = 120) -> None:
    """Until Tune has written its experiment state (every 2 s, TUNE_GLOBAL_CHECKPOINT_S) after `after`: then the
    snapshot holds the trial that had finished by then. A fixed sleep was 1 s longer than the period, which a
    busy machine can outlast."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.stat().st_mtime > after for p in folder.rglob("experiment_state-*.json")):
            return
        time.sleep(0.2)
    raise AssertionError(f"Tune wrote no experiment state under {folder} within {timeout} s")


def test_a_search_whose_driver_was_killed_resumes_without_losing_or_repeating_a_trial(tmp_path, shapes):
    """`effsearch search` of 3 real trials of 3 epochs, one at a time. Once the first trial has finished and the
    second has reported its first epoch, the driver and every process under it are SIGKILLed. `effsearch search
    --resume` then continues: the study ends with exactly 3 trials, none repeated; the first keeps its values and
    its one MLflow run; the interrupted trial continues in its own run from its last checkpoint."""
    job = {"name": "resumed", "data": {"train": shapes["train"], "val": shapes["val"]},
           "search": {"space": "lite_cpu", "trials": 3, "scheduler": "fifo", "sampler": "random", "seed": 1,
                      "max_concurrent_trials": 1},
           "train": {"epochs": 3, "eval_every": 1}, "resources": {"cpus_per_worker": 1}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    uri = empty_mlflow_store(tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)}
    env = {k: v for k, v in env.items() if not k.startswith("RAY_")}
    command = [sys.executable, "-m", "search.cli", "search", "job.yaml"]
    driver = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    client = MlflowClient(uri)
    deadline, killed = time.monotonic() + 600, []
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.5)
            experiment = client.get_experiment_by_name("resumed")
            if experiment is None:
                continue
            runs = client.search_runs([experiment.experiment_id], f"tags.`{PARENT_TAG}` != ''")
            done = [r for r in runs if r.data.tags.get(STATE_TAG) == "complete"]
            running = [r for r in runs if r.info.status == "RUNNING" and "epoch_s" in r.data.metrics]
            if done and running:
                _wait_for_tune_snapshot(tmp_path, after=time.time())
                processes = _descendants(driver.pid)
                driver.kill()
                for process in processes:
                    process.send_signal(signal.SIGKILL)
                    killed.append(process.pid)
                break
    finally:
        if driver.poll() is None:
            for process in _descendants(driver.pid):
                process.kill()
            driver.kill()
        output = driver.communicate()[0]
    assert killed, f"the first trial never finished while the second ran:\n{output[-3000:]}"
    experiment_id = client.get_experiment_by_name("resumed").experiment_id
    before = {r.data.tags[TRIAL_ID_TAG]: r for r in client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` != ''")}
    finished_before = {tid: r.data.metrics["map"] for tid, r in before.items() if r.data.tags.get(STATE_TAG) == "complete"}

    resumed = subprocess.run(command + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert "resuming the search of parent run" in resumed.stdout

    study = optuna.load_study(study_name="resumed", storage=_journal(tmp_path / ".effsearch" / "optuna.journal"))
    assert len(study.trials) == 3
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 3
    (parent,) = client.search_runs([experiment_id], "tags.`effsearch.kind` = 'search'")
    assert parent.info.status == "FINISHED"
    runs = _children(client, experiment_id, parent.info.run_id)
    trial_ids = [r.data.tags[TRIAL_ID_TAG] for r in runs]
    assert len(runs) == 3 and len(set(trial_ids)) == 3  # no MLflow run duplicated
    after = {r.data.tags[TRIAL_ID_TAG]: r for r in runs}
    for trial_id, ap in finished_before.items():
        assert after[trial_id].data.metrics["map"] == ap
        history = client.get_metric_history(after[trial_id].info.run_id, "map")
        assert sorted(m.step for m in history) == [1, 2, 3]  # not trained again
    interrupted = [tid for tid, r in before.items() if r.data.tags.get(STATE_TAG) != "complete"]
    assert interrupted and all(after[tid].data.tags[STATE_TAG] == "complete" for tid in interrupted)
    resumed_from = [after[tid].data.metrics.get("resumed_from_epoch") for tid in interrupted]
    print(f"killed {len(killed)} processes; finished before: {finished_before}; interrupted trials resumed from "
          f"epochs {resumed_from}")
    assert any(epoch and epoch >= 1 for epoch in resumed_from)


def test_a_bad_warm_start_fails_before_the_data_is_read_and_leaves_no_run(tmp_path, shapes, monkeypatch):
    """It failed after decoding both splits, and left a FAILED parent run with no reason each time."""
    from mlflow.tracking import MlflowClient

    from conftest import empty_mlflow_store
    from search.job import parse_job
    from search.run import run_search
    from test_search import _raw

    uri = empty_mlflow_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    said = []
    with pytest.raises(JobError, match=r"--warm-start nope: no search of that name in this store \(known: none\)"):
        run_search(parse_job(_raw(shapes, "cold", search={"trials": 1})), store=tmp_path / "store",
                   say=said.append, warm_start_from="nope")
    assert not [line for line in said if line.startswith("data:")]
    assert MlflowClient(uri).get_experiment_by_name("cold") is None


def test_a_resumed_searchs_progress_clock_starts_again(capsys):
    """Tune restores the progress printer from its pickled state on --resume: the elapsed time it prints is the
    resumed search's ("[14:52]" counted the time the search was stopped)."""
    import pickle

    from search.progress import ProgressPrinter

    printer = ProgressPrinter(total_trials=2, total_epochs=3)
    printer.started -= 14 * 60
    restored = pickle.loads(pickle.dumps(printer))
    restored._say("resumed")
    assert capsys.readouterr().out == "[00:00] resumed\n"
