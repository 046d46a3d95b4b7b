"""`effsearch predict`: load a logged model through MLflow and write COCO detections (and drawn copies) for images."""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from trainers.errors import PredictError
from trainers.words import counted

EXTRA_FILES = "extra_files"  # where mlflow.pytorch.log_model puts extra_files inside the model
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Prediction:
    images: int
    detections: int
    out: Path
    drawn: Path | None
    # What the given folders held besides image files, which predict does not read: "3 subfolders in DIR".
    skipped: tuple[str, ...] = ()


def load_detector(model_uri: str, device=None):
    """A trainers.predict.Detector for a models:/, runs:/ or local MLflow model, on CUDA if present."""
    import mlflow
    from mlflow.exceptions import MlflowException

    # Into a folder of ours, deleted once the model is in memory: without dst_path MLflow downloads a runs:/ URI
    # into a temporary folder that nothing deletes, a copy of the model in /tmp for every call.
    with tempfile.TemporaryDirectory(prefix="effsearch-predict-") as scratch:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=scratch))
        except (MlflowException, OSError) as err:
            raise PredictError(f"{model_uri}: cannot load an MLflow model: {_first_line(err)}") from None
        return _detector_in(local, model_uri, device)


def _detector_in(local: Path, model_uri: str, device):
    """The Detector of the model folder `local`, read into memory (the caller deletes the folder)."""
    # torch, effdet and timm once the model is found: a wrong name or URI is answered without them
    import mlflow.pytorch
    import torch
    from mlflow.exceptions import MlflowException

    from trainers.checkpoint import CATEGORIES_FILE, SPEC_FILE
    from trainers.predict import Detector, on_device
    from trainers.spec import ModelSpec

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        # A pt2 graph: MLflow loads it without unpickling code, and on the CPU, where it was exported.
        graph = mlflow.pytorch.load_model(str(local))
    except (MlflowException, OSError) as err:
        raise PredictError(f"{model_uri}: cannot load an MLflow model: {_first_line(err)}") from None
    spec_file, categories_file = local / EXTRA_FILES / SPEC_FILE, local / EXTRA_FILES / CATEGORIES_FILE
    if not spec_file.is_file():
        raise PredictError(f"{model_uri}: not an effsearch model (it carries no {SPEC_FILE})")
    if not categories_file.is_file():
        raise PredictError(f"{model_uri}: the model carries no {CATEGORIES_FILE} (it was logged before effsearch "
                           f"recorded the dataset's category ids); retrain or re-log it to predict with it")
    spec = ModelSpec.from_dict(json.loads(spec_file.read_text()), where=f"{model_uri} {SPEC_FILE}")
    categories = json.loads(categories_file.read_text())
    return Detector(on_device(graph, device) if device.type != "cpu" else graph, spec, categories, device)


def predict(model_uri: str, inputs: list[str], out: Path, *, draw_dir: Path | None = None,
            score_threshold: float = 0.3, device=None) -> Prediction:
    """Detect in every image (files, and image files in folders); write COCO results to `out`, drawn copies to draw_dir."""
    paths, skipped = image_paths(inputs)  # bad paths fail before the model loads, and before torch is imported
    if draw_dir is not None and draw_dir.exists() and not draw_dir.is_dir():
        raise PredictError(f"--draw {draw_dir}: not a folder (the boxed copies are written into one)")
    if draw_dir is not None and any(p.parent.resolve() == draw_dir.resolve() for p in paths):
        # A copy is named for its image: drawn into the image's own folder, it would replace the original.
        raise PredictError(f"--draw {draw_dir}: holds images given to predict, which the boxed copies would "
                           "overwrite; name another folder")
    detector = load_detector(model_uri, device)
    from trainers.predict import coco_results, draw, read_image

    records: list[dict] = []
    if draw_dir is not None:
        draw_dir.mkdir(parents=True, exist_ok=True)
    drawn_names: set[str] = set()
    for start in range(0, len(paths), 64):  # a bounded number of decoded images in memory at once
        chunk = paths[start:start + 64]
        images = [read_image(p) for p in chunk]
        for path, image, detections in zip(chunk, images, detector(images)):
            found = coco_results(str(path), detections, score_threshold)
            records.extend(found)
            if draw_dir is not None:
                name = _unique(path.name, drawn_names)
                draw(image, found, detector.names).save(draw_dir / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records))
    return Prediction(len(paths), len(records), out, draw_dir, skipped)


def _unique(name: str, taken: set[str]) -> str:
    # Two folders may hold the same file name; the second copy gets a number rather than overwriting the first.
    stem, suffix, n = Path(name).stem, Path(name).suffix, 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}{suffix}"
    taken.add(name)
    return name


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def image_paths(inputs: list[str | Path]) -> tuple[list[Path], tuple[str, ...]]:
    """Files as given, and the image files (by suffix) directly inside each folder, in name order; and, per
    folder, what it holds that is not read. Subfolders are not searched: a folder of outputs (--draw) inside
    the input folder would otherwise be read as input on the next run."""
    paths, skipped = [], []
    for given in map(Path, inputs):
        if given.is_dir():
            entries = list(given.iterdir())
            found = sorted(p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            folders = sum(p.is_dir() for p in entries)
            others = len(entries) - len(found) - folders
            left = [counted(n, noun) for n, noun in ((folders, "subfolder"), (others, "other file")) if n]
            if not found:
                raise PredictError(f"{given}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder"
                                   + (f"; it holds {' and '.join(left)}, and subfolders are not searched"
                                      if left else ""))
            if left:
                skipped.append(f"{' and '.join(left)} in {given}")
            paths.extend(found)
        elif given.is_file():
            paths.append(given)
        else:
            raise PredictError(f"{given}: no such image file or folder")
    return paths, tuple(skipped)
