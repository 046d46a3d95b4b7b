"""Shared fixtures: a small shapes dataset and a throwaway MLflow store; nothing is fetched from a hub."""
import contextlib
import functools
import os
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Ray waits 30 s for a new head's GCS to publish its port; on CI's 2 busy cores one cluster head took longer
# and three tests errored in set-up. 120 s is what Ray itself allows a slower (RocksDB) GCS.
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)

import pytest  # noqa: E402
from pathlib import Path  # noqa: E402


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """A small deterministic shapes dataset: {split: {annotations, images}}."""
    from trainers.shapes import make_shapes

    return make_shapes(tmp_path_factory.mktemp("shapes"), train_images=32, val_images=12, seed=3)


# The recipe that learns on 2 CPU cores: lite_cpu's reference variant (spaces.search_spaces.LITE_CPU_REFERENCE),
# EfficientDet-Lite at 192 px with a BiFPN of 48 channels x 2 cells, on the demo's 600 train / 100 val shapes for
# 5 epochs.


@pytest.fixture(scope="session")
def trained_shapes_model(tmp_path_factory):
    """That recipe trained once for the session (it takes about 2 minutes): tests/test_learning.py asserts its AP,
    tests/test_predict.py logs, promotes and predicts with it. {checkpoint, metrics, seconds, spec, shapes}."""
    import shutil
    import time

    from spaces.search_spaces import lite_cpu_reference
    from trainers.loop import TrialPlan, fit
    from trainers.recipe import TrainConfig
    from trainers.shapes import make_shapes

    root = tmp_path_factory.mktemp("trained-shapes")
    paths = make_shapes(root / "shapes")  # the demo's 600 train / 100 val images, seed 0
    spec = lite_cpu_reference(3)
    epochs, final, history = 5, root / "final-checkpoint", []

    def keep(metrics, checkpoint):
        history.append(metrics)
        if metrics["epoch"] == epochs:
            shutil.copytree(checkpoint, final)

    start = time.perf_counter()
    fit(TrialPlan(spec, training_data(paths), TrainConfig(epochs=epochs, eval_every=epochs, threads=2)), keep)
    return {"checkpoint": final, "metrics": history[-1], "seconds": time.perf_counter() - start, "spec": spec,
            "shapes": paths}


@functools.cache
def _empty_store_template() -> Path:
    """An empty SQLite MLflow store, created once for the session and removed at its end."""
    import atexit
    import shutil
    import tempfile

    from mlflow.tracking import MlflowClient

    template = Path(tempfile.mkdtemp(prefix="mlflow-template-")) / "mlflow.db"
    MlflowClient(f"sqlite:///{template}").search_experiments()  # creates it
    atexit.register(shutil.rmtree, template.parent, True)
    return template


def empty_mlflow_store(folder: Path) -> str:
    """The URI of the SQLite MLflow store folder/mlflow.db, new and empty unless it is there already. A new one is
    a copy of the session's empty template: MLflow runs its schema migrations when it creates a store, about
    5 s each on 2 cores, and every search test makes one."""
    import shutil

    db = Path(folder) / "mlflow.db"
    if not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_empty_store_template(), db)
    return f"sqlite:///{db}"


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    """A real SQLite MLflow store in a temporary folder, selected the standard way."""
    uri = empty_mlflow_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    return uri


@contextlib.contextmanager
def searched_store(folder, raw_job):
    """Run a real search (local Ray) for raw_job into an SQLite store under folder; (outcome, client). The search
    starts its own Ray, shut down after, unless one is up already (a module's shared Ray): it joins that one and
    leaves it up."""
    import ray
    from mlflow.tracking import MlflowClient

    from search.job import parse_job
    from search.run import run_search

    uri = empty_mlflow_store(folder)
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    own_ray = not ray.is_initialized()
    try:
        outcome = run_search(parse_job(raw_job), store=folder / "store", say=lambda _: None)
        yield outcome, MlflowClient(uri)
    finally:
        if own_ray:
            ray.shutdown()
        patch.undo()


def training_data(paths, **options):
    """The validated, indexed TrainingData of a {split: {annotations, images}} dataset."""
    from trainers.validate import load_training_data

    return load_training_data(paths["train"]["annotations"], paths["train"]["images"],
                              paths["val"]["annotations"], paths["val"]["images"], **options)[0]


@pytest.fixture
def own_tempdir(tmp_path, monkeypatch):
    """tempfile's folder (MLflow's and ours alike) is the test's own, empty: a test can then see what was left."""
    import tempfile

    folder = tmp_path / "temp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def ray_tmpdir(monkeypatch):
    """A Ray temp folder of the test's own, so that a cluster's address file is not the machine's; short, since
    Ray's socket paths must fit 107 characters."""
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="r", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", folder)
    yield Path(folder)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def module_by_value(request):
    """Ray's workers cannot import a test module: its stand-in trainables go to them by value, for this test only
    (left registered, a later test's Tune callback in that module was pickled by value with everything it
    reaches, and failed on a lock)."""
    import ray

    ray.cloudpickle.register_pickle_by_value(request.module)
    yield
    ray.cloudpickle.unregister_pickle_by_value(request.module)


def start_cluster(**head_node_args):
    """A ray.cluster_utils.Cluster head; if it does not come up, the error carries the tail of its GCS logs (the
    folder is gone once a CI run ends)."""
    from ray.cluster_utils import Cluster

    try:
        return Cluster(initialize_head=True, head_node_args=head_node_args)
    except Exception as err:
        root = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray"
        logs = sorted(root.glob("session_*/logs/gcs_server.*"), key=lambda p: p.stat().st_mtime)[-2:]
        tails = "\n".join(f"--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-30:]) for p in logs)
        raise RuntimeError(f"the cluster's head did not start: {err}\n{tails or 'no GCS log under ' + str(root)}")
