"""Logging a trained trial as an MLflow model: a pt2 graph of the raw network, with the spec beside it.

The trial saves the model folder beside its last checkpoint, in its own process (save_model_folder), and the
driver only uploads it (log_model): torch.export and its serialisation take 3-7 s a model here, and in the driver
they held up every other trial's results and starts. MLflow has no call that logs a folder saved earlier as a
logged model of a run, so log_model hands Model.log a flavor whose save_model copies that folder (SavedFolder).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

from search.tracking import MODEL_URI_TAG

MODEL_PIP_REQUIREMENTS = ["torch==2.14.1", "effdet==0.4.1"]
MODEL_FOLDER = "mlflow-model"  # inside a trial's last checkpoint
MLMODEL = "MLmodel"


def save_model_folder(checkpoint_dir: str | Path, into: str | Path | None = None) -> Path:
    """Save the network that checkpoint_dir deploys as a local MLflow pt2 model (torch.export: loading it runs
    no pickled code), in `into` or else in the checkpoint's MODEL_FOLDER; return the folder.

    The raw EfficientDet exports; effdet's NMS does not, so the spec travels beside the graph as spec.json
    and prediction rebuilds anchors and post-processing from it. categories.json (the dataset's category
    ids in label order) travels too, where the checkpoint has it.
    """
    import mlflow.pytorch
    import numpy as np
    from mlflow.models import Model, ModelSignature
    from mlflow.types import Schema, TensorSpec

    from trainers.checkpoint import CATEGORIES_FILE, SPEC_FILE, load_model

    checkpoint_dir = Path(checkpoint_dir)
    folder = Path(into) if into is not None else checkpoint_dir / MODEL_FOLDER
    model, spec = load_model(checkpoint_dir)
    extra_files = [str(p) for p in (checkpoint_dir / SPEC_FILE, checkpoint_dir / CATEGORIES_FILE) if p.is_file()]
    shape = (3, spec.image_size, spec.image_size)
    # A batch of 2 in the example makes torch.export keep the batch dimension dynamic.
    example = np.zeros((2, *shape), dtype=np.float32)
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *shape))]))
    mlflow.pytorch.save_model(model, str(folder), signature=signature, input_example=example,
                              pip_requirements=MODEL_PIP_REQUIREMENTS, extra_files=extra_files)
    # pt2 needs the example to trace, and MLflow then stores it twice as JSON: at D0's 512 px, 31.5 MB of zeros
    # beside a 24.6 MB graph, in every logged model. The signature already gives the input's shape and type.
    saved = Model.load(str(folder))
    for name in (saved.saved_input_example_info or {}).values():
        if isinstance(name, str) and (folder / name).is_file():
            (folder / name).unlink()
    saved.saved_input_example_info = None
    saved.model_size_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    saved.save(str(folder / MLMODEL))
    return folder


class SavedFolder:
    """A flavor for mlflow.models.Model.log that saves by copying a folder save_model_folder wrote: the folder's
    MLmodel gives the flavors and signature, Model.log the run's and logged model's ids."""

    def __init__(self, folder: Path):
        self.folder = folder

    def save_model(self, path: str, mlflow_model, **_) -> None:
        from mlflow.models import Model

        shutil.copytree(self.folder, path)
        saved = Model.load(str(self.folder))
        for field in ("flavors", "signature", "saved_input_example_info", "model_size_bytes", "metadata"):
            setattr(mlflow_model, field, getattr(saved, field))
        mlflow_model.save(str(Path(path) / MLMODEL))


def log_model(run_id: str, checkpoint_dir: str) -> None:
    """Log the model folder of a trial's last checkpoint as the run's MLflow model, and tag the run with its URI.
    A checkpoint without the folder (its trial did not save one: a search recorded before trials did) is
    exported here."""
    import mlflow
    from mlflow.models import Model

    folder = Path(checkpoint_dir) / MODEL_FOLDER
    with tempfile.TemporaryDirectory() as scratch:
        if not (folder / MLMODEL).is_file():
            folder = save_model_folder(checkpoint_dir, into=Path(scratch) / MODEL_FOLDER)
        with mlflow.start_run(run_id=run_id):
            info = Model.log(artifact_path=None, name="model", flavor=SavedFolder(folder), flavor_name="pytorch")
    MlflowClient().set_tag(run_id, MODEL_URI_TAG, info.model_uri)
