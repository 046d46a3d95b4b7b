"""Shared fixtures: a small shapes dataset and a throwaway MLflow store; nothing is fetched from a hub."""
import os
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """A small deterministic shapes dataset: {split: {annotations, images}}."""
    from trainers.shapes import make_shapes

    return make_shapes(tmp_path_factory.mktemp("shapes"), train_images=32, val_images=12, seed=3)


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    """A real SQLite MLflow store in a temporary folder, selected the standard way."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    return uri
