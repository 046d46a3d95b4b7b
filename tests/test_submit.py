"""`effsearch submit` and `effsearch jobs` against the Jobs API of a real multi-node Ray cluster on this machine."""
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import start_cluster
from search.cli import main
from search.tracking import PARENT_TAG, REASON_TAG, TRIAL_ID_TAG
from search.states import STATE_TAG
from conftest import empty_mlflow_store

TINY = {"space": "lite_cpu", "trials": 2, "scheduler": "fifo", "sampler": "random"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reset_auth_tokens() -> None:
    """Ray caches the token it authenticates with: read it again where the environment now says."""
    from ray._private.authentication_test_utils import reset_auth_token_state

    reset_auth_token_state()


@pytest.fixture(scope="module")
def jobs_api():
    """A head with its dashboard (the Jobs API) and no CPU to give, and two worker nodes of 2 CPUs. The nodes find
    this project's Python first on PATH, as a cluster built from cluster.yaml does."""
    import ray

    try:
        with pytest.MonkeyPatch.context() as patch:
            folder = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must fit 107 characters
            patch.setenv("RAY_TMPDIR", folder)
            patch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
            patch.delenv("RAY_ADDRESS", raising=False)
            # The cluster's own home: a submission's default driver store (~/.effsearch on the head) lands here.
            home = Path(tempfile.mkdtemp(prefix="home", dir=folder))
            patch.setenv("HOME", str(home))
            # Token authentication, as Ray sets up for a new cluster, with the token in the cluster's home. An
            # earlier test's local ray.init() leaves RAY_AUTH_MODE=token in this process, and then the head's GCS
            # found no token under this home and aborted (CI, twice); alone, the module ran without auth.
            patch.setenv("RAY_AUTH_MODE", "token")
            patch.delenv("RAY_AUTH_TOKEN", raising=False)
            patch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
            (home / ".ray").mkdir()
            (home / ".ray" / "auth_token").write_text(uuid.uuid4().hex)
            _reset_auth_tokens()
            port = _free_port()
            # Every node's dashboard agent would listen on 52365: the head's must get a port (the Jobs API submits
            # through it), and another Ray on this machine may hold that one.
            cluster = start_cluster(num_cpus=0, include_dashboard=True, dashboard_host="127.0.0.1",
                                    dashboard_port=port, dashboard_agent_listen_port=_free_port())
            try:
                for _ in range(2):
                    # Each node its own temp folder, as on separate machines: nodes that share one unpack the
                    # job's packages over each other, and the driver's working folder vanished under it (seen).
                    cluster.add_node(num_cpus=2, temp_dir=tempfile.mkdtemp(prefix="r", dir=folder),
                                     dashboard_agent_listen_port=_free_port())
                cluster.wait_for_nodes()
                yield f"http://127.0.0.1:{port}"
            finally:
                ray.shutdown()
                cluster.shutdown()
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        _reset_auth_tokens()  # later tests' Ray reads its own token again, not this cluster's


def _job_file(tmp_path, shapes, name, **train) -> Path:
    # Checkpoints go to a folder every node mounts, as an NFS share would be on a real cluster.
    raw = {"name": name, "data": {"train": shapes["train"], "val": shapes["val"]}, "search": TINY,
           "train": {"epochs": 1, "eval_every": 1, **train}, "resources": {"cpus_per_worker": 1},
           "storage_path": str(tmp_path / "shared")}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _submit(capsys, job_file, address, store=None) -> tuple[str, str]:
    assert main(["submit", str(job_file), "--address", address, *(["--store", str(store)] if store else [])]) == 0
    out = capsys.readouterr().out
    return re.search(r"submitted job (\S+)", out).group(1), out


def _status(capsys, address, job_id) -> str:
    assert main(["jobs", "status", job_id, "--address", address]) == 0
    return capsys.readouterr().out


def _wait_for(capsys, address, job_id, statuses, timeout_s=600) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = _status(capsys, address, job_id)
        if any(f": {s} " in out for s in statuses):
            return out
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} never reached {statuses}: {out}")


def test_a_submitted_search_runs_on_the_cluster_and_records_its_trials(jobs_api, tmp_path, shapes, capsys,
                                                                         monkeypatch):
    uri = empty_mlflow_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    job_id, out = _submit(capsys, _job_file(tmp_path, shapes, "submitted"), jobs_api)  # the default store
    assert "experiment: submitted" in out and f"tracking URI: {uri}" in out

    assert main(["jobs", "list", "--address", jobs_api]) == 0
    listed = capsys.readouterr().out
    assert job_id in listed and "submitted" in listed
    assert "effsearch.check" not in listed and len(re.findall(r"raysubmit_", listed)) == 1  # the path check is gone

    final = _wait_for(capsys, jobs_api, job_id, ["SUCCEEDED", "FAILED", "STOPPED"])
    assert main(["jobs", "logs", job_id, "--address", jobs_api]) == 0
    logs = capsys.readouterr().out
    assert ": SUCCEEDED " in final, logs
    assert "2 trials finished" in logs and "tracking store: " + uri in logs
    assert "concurrency: 4 trials at once" in logs  # two nodes of 2 CPUs, 1 CPU a trial: the default
    assert main(["jobs", "logs", job_id, "--follow", "--address", jobs_api]) == 0  # returns once the job has ended
    assert "2 trials finished" in capsys.readouterr().out

    # The job's driver wrote to the store the submission named; its store on the head is the one asked for.
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("submitted")
    runs = client.search_runs([experiment.experiment_id])
    trials = [r for r in runs if PARENT_TAG in r.data.tags]
    assert len(trials) == 2 and all(r.data.tags[STATE_TAG] == "complete" for r in trials)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert (Path(os.environ["HOME"]) / ".effsearch" / "optuna.journal").is_file()  # the head's ~
    assert len(list((tmp_path / "shared").glob("submitted-*/*/checkpoint_*"))) == 2  # each trial's, on the share


def test_jobs_stop_interrupts_the_search_and_submit_resume_finishes_it(jobs_api, tmp_path, shapes, capsys,
                                                                        monkeypatch):
    uri = empty_mlflow_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    job_file = _job_file(tmp_path, shapes, "stopped", epochs=4)
    job_id, _ = _submit(capsys, job_file, jobs_api, tmp_path / "store")
    client = MlflowClient(uri)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # stop it once a trial is training
        experiment = client.get_experiment_by_name("stopped") if (tmp_path / "mlflow.db").exists() else None
        if experiment and any(PARENT_TAG in r.data.tags for r in client.search_runs([experiment.experiment_id])):
            break
        time.sleep(0.5)
    else:
        pytest.fail(_status(capsys, jobs_api, job_id))

    assert main(["jobs", "stop", job_id, "--address", jobs_api]) == 0
    assert f"job {job_id}: STOPPED" in capsys.readouterr().out
    runs = client.search_runs([experiment.experiment_id])
    assert runs and not [r for r in runs if r.info.status == "RUNNING"]
    (parent,) = [r for r in runs if PARENT_TAG not in r.data.tags]
    assert parent.info.status == "KILLED"
    stopped = {r.info.run_id for r in runs if r.data.tags.get(REASON_TAG, "").startswith("the search was stopped")}
    assert stopped  # the trial that was training says why it stopped, and that --resume continues it

    # The stopped search continues where it was: same parent run, both trials, no trial trained twice over.
    assert main(["submit", str(job_file), "--address", jobs_api, "--store", str(tmp_path / "store"),
                 "--resume"]) == 0
    resumed = re.search(r"submitted job (\S+)", capsys.readouterr().out).group(1)
    final = _wait_for(capsys, jobs_api, resumed, ["SUCCEEDED", "FAILED", "STOPPED"])
    assert main(["jobs", "logs", resumed, "--address", jobs_api]) == 0
    logs = capsys.readouterr().out
    assert ": SUCCEEDED " in final, logs
    assert f"resuming the search of parent run {parent.info.run_id}" in logs
    runs = client.search_runs([experiment.experiment_id])
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    complete = [r for r in runs if r.data.tags.get(STATE_TAG) == "complete"]
    assert len({r.data.tags[TRIAL_ID_TAG] for r in complete}) == len(complete) == 2
    # A stopped trial that the resumed search completed no longer says it was stopped.
    assert stopped <= {r.info.run_id for r in complete} and not [r for r in complete if REASON_TAG in r.data.tags]


def test_a_path_the_cluster_lacks_is_named_before_any_job_is_left(jobs_api, tmp_path, shapes, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    job_file = _job_file(tmp_path, shapes, "nowhere")
    raw = yaml.safe_load(job_file.read_text())
    raw["data"]["val"]["images"] = "/nonexistent/effsearch/val-images"
    job_file.write_text(yaml.safe_dump(raw))
    assert main(["submit", str(job_file), "--address", jobs_api]) == 2
    err = capsys.readouterr().err
    assert "job.data.val.images: /nonexistent/effsearch/val-images does not exist on the cluster" in err
    assert main(["jobs", "list", "--address", jobs_api]) == 0
    assert "nowhere" not in capsys.readouterr().out  # neither the check nor a search job remains
    for action in ("status", "logs", "stop"):
        assert main(["jobs", action, "raysubmit_nope", "--address", jobs_api]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("effsearch: error: job raysubmit_nope: ") and "\n" not in err, err


def test_submit_and_jobs_refuse_what_is_not_a_jobs_api_in_one_line(tmp_path, shapes, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    job_file = _job_file(tmp_path, shapes, "refused")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["submit", str(job_file)]) == 2
    assert "no cluster named: pass --address http://HEAD:8265 or set RAY_ADDRESS" in capsys.readouterr().err

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert main(["jobs", "list"]) == 2
    assert "RAY_ADDRESS 127.0.0.1:6379: submit and jobs talk to a cluster's Jobs API" in capsys.readouterr().err

    import importlib

    importlib.import_module("ray.job_submission")  # before the clock starts: cold, it takes seconds on busy cores
    # A refused connection is answered at once (search/cluster.py checks the port), not after the client waits.
    started = time.monotonic()
    assert main(["jobs", "status", "raysubmit_x", "--address", f"http://127.0.0.1:{_free_port()}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("effsearch: error: cannot reach the Ray Jobs API at http://127.0.0.1:") and \
        len(err.strip().splitlines()) == 1
    assert time.monotonic() - started < 10

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert main(["submit", str(job_file), "--address", "http://127.0.0.1:8265"]) == 2
    assert "set MLFLOW_TRACKING_URI (or --tracking-uri)" in capsys.readouterr().err
    assert main(["jobs", "logs", "--address", "http://127.0.0.1:8265"]) == 2
    assert "jobs logs: give the job id" in capsys.readouterr().err
