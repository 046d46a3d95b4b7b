"""The command line as a user meets it: help for every command, and `ui` serving the tracking store."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from search.cli import main

COMMANDS = ["demo", "search", "submit", "jobs", "frontier", "promote", "predict", "gc", "describe", "make-shapes", "ui"]


def test_the_commands_listed_here_are_the_commands_effsearch_has(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    usage = capsys.readouterr().out
    assert usage[usage.index("{") + 1:usage.index("}")].split(",") == COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert f"usage: effsearch {command}" in capsys.readouterr().out


def test_frontier_of_unknown_experiment_is_one_line(mlflow_uri, capsys):
    assert main(["frontier", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("effsearch: error: no experiment named 'nope'") and "\n" not in err


def test_the_frontier_of_an_experiment_with_no_finished_trial_says_so(mlflow_uri, capsys):
    from mlflow.tracking import MlflowClient

    MlflowClient(mlflow_uri).create_experiment("empty")
    capsys.readouterr()
    assert main(["frontier", "empty"]) == 0
    # It said "compared 0 complete runs of 0 searches (runs recorded before data hashes)" over a bare table header.
    assert capsys.readouterr().out == "empty: no trial of this experiment has finished training\n"


def _main_in_a_fresh_interpreter(command, cwd=None, env=()):
    """main(command) in a new Python, so that nothing an earlier test imported counts; it prints the exit status
    and whether torch was imported."""
    code = f"import sys; from search.cli import main; rc = main({command!r}); print(rc, 'torch' in sys.modules)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={**os.environ, **dict(env), "PYTHONPATH": str(Path(__file__).parents[1])})


@pytest.mark.parametrize("command", [["frontier", "nope"], ["promote", "nope", "--max-gflops", "1"], ["gc", "nope"]])
def test_the_commands_that_read_the_store_answer_without_importing_torch(command, mlflow_uri):
    """main catches the errors it prints by their light base (trainers/errors.py): importing each error's own module
    to catch it cost every command torch, effdet and timm first (`frontier nope`: 8.0 s, now 3.4 s, medians of 3
    on an idle machine)."""
    result = _main_in_a_fresh_interpreter(command, env={"MLFLOW_TRACKING_URI": mlflow_uri})
    assert result.stdout.split() == ["2", "False"], result.stderr[-2000:]
    assert result.stderr.strip() == f"effsearch: error: no experiment named 'nope' in {mlflow_uri} (known: Default)"


@pytest.mark.parametrize("command, message", [
    (["search", "job.yaml"], "job.yaml: job.serach: unknown key"),
    (["describe", "d9"], "d9: neither a preset (d0, d1"),
    (["predict", "models:/nope/1", "nothere.jpg"], "nothere.jpg: no such image file or folder"),
    (["predict", "models:/nope/1", "job.yaml"], "models:/nope/1: cannot load an MLflow model: Registered Model"),
])
def test_bad_input_is_answered_without_importing_torch(command, message, tmp_path):
    """Reading and checking a job file, a model name or an image path needs no torch: a typo is answered in seconds,
    where it waited for torch, effdet and timm before (`search`: 5.0 s against 0.7 s, medians of 3 interleaved;
    `predict` of a model that is not there: 11.5 s against 3.4 s)."""
    (tmp_path / "job.yaml").write_text("name: t\nserach: {}\n")
    result = _main_in_a_fresh_interpreter(command, cwd=tmp_path)
    assert result.stdout.split() == ["2", "False"], result.stderr[-2000:]
    assert result.stderr.strip().startswith(f"effsearch: error: {message}")


@pytest.mark.parametrize("command, message", [
    (["demo", "--trials", "0"], "demo --trials: must be at least 1, got 0"),  # 0 ran the full demo, -1 never ended
    (["demo", "--epochs", "-1"], "demo --epochs: must be at least 1, got -1"),
    (["predict", "models:/x@production", ".", "--score-threshold", "2"],
     "predict --score-threshold: a score lies in [0, 1], got 2"),
    (["make-shapes", "shapes", "--train", "-1"], "make-shapes --train: must be 0 or more, got -1"),
])
def test_counts_and_scores_out_of_range_are_one_line_before_any_work(command, message, tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(command) == 2
    assert capsys.readouterr().err == f"effsearch: error: {message}\n"
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_folder_that_cannot_be_made_is_one_line_naming_it(tmp_path, capsys):
    """An output folder under a file (or on a read-only mount): one line naming the path, exit 1, no traceback."""
    (tmp_path / "a-file").write_text("")
    for command in (["make-shapes", str(tmp_path / "a-file" / "shapes")],
                    ["demo", "--dir", str(tmp_path / "a-file" / "demo")]):
        assert main(command) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"effsearch: error: {tmp_path / 'a-file'}/") and err.endswith(": Not a directory"), err
        assert "\n" not in err


def test_make_shapes_is_deterministic(tmp_path):
    assert main(["make-shapes", str(tmp_path / "a"), "--train", "5", "--val", "2"]) == 0
    assert main(["make-shapes", str(tmp_path / "b"), "--train", "5", "--val", "2"]) == 0
    for split in ("train", "val"):
        a = (tmp_path / "a" / split / "annotations.json").read_text()
        assert a == (tmp_path / "b" / split / "annotations.json").read_text()
        data = json.loads(a)
        assert sorted(c["id"] for c in data["categories"]) == [1, 3, 5]
        first = sorted((tmp_path / "a" / split / "images").iterdir())[0]
        assert first.read_bytes() == (tmp_path / "b" / split / "images" / first.name).read_bytes()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_tracking_store_on_loopback(tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    MlflowClient(mlflow_uri).create_experiment("visible-in-ui")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    server = subprocess.Popen([sys.executable, "-m", "search.cli", "ui", "--port", str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    started = []
    try:
        body, deadline = None, time.monotonic() + 90
        while time.monotonic() < deadline and body is None:
            try:
                url = f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search?max_results=10"
                body = json.loads(urllib.request.urlopen(url, timeout=5).read())
            except OSError:
                time.sleep(0.25)
        assert body is not None, "the MLflow UI did not answer within 90 s"
        assert "visible-in-ui" in {e["name"] for e in body["experiments"]}
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
        assert "<html" in page.lower()
        started.extend(psutil.Process(server.pid).children(recursive=True))  # mlflow, uvicorn, its job runner...
        assert started
        # Stopped as a service manager stops it: SIGTERM to the command's own process, not to its group.
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(started, timeout=10)
        assert not alive, [(p.pid, p.cmdline()[:4]) for p in alive]
        with pytest.raises(ConnectionRefusedError):  # nothing listens there any more (a bind could still meet the
            socket.create_connection(("127.0.0.1", port), timeout=5).close()  # requests' sockets in TIME_WAIT)
    finally:
        for process in [*started, psutil.Process(server.pid)] if server.poll() is None else started:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()  # only what this test started, should the command not have stopped it
        server.wait(timeout=30)
    # It prints each experiment's link, opening on the training runs (tests/test_browser.py follows one).
    experiment_id = MlflowClient(mlflow_uri).get_experiment_by_name("visible-in-ui").experiment_id
    printed = server.stdout.read().decode()
    assert f"visible-in-ui: http://127.0.0.1:{port}/#/experiments/{experiment_id}?workflowType=machine_learning" \
        in printed, printed[-2000:]


def test_ui_on_a_port_that_is_taken_says_so_in_one_line(mlflow_uri, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["ui", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err == f"effsearch: error: port {port} on 127.0.0.1 is taken (another MLflow UI?): choose another with " \
                  "--port N, or open the one running\n"
