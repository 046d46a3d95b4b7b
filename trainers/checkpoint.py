"""Per-epoch training checkpoints and the saved model: weights in safetensors, the rest loaded weights_only."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainers.annotations import SplitIndex
from trainers.model import build_model
from trainers.spec import ModelSpec

SPEC_FILE = "spec.json"
# The dataset's category ids in label order (label 1 is the first): predictions name the user's own ids.
CATEGORIES_FILE = "categories.json"
MODEL_FILE = "model.json"  # names the weights file to deploy: the better-scoring of raw and EMA
RAW_WEIGHTS = "raw.safetensors"
EMA_WEIGHTS = "ema.safetensors"
STATE_FILE = "trainer_state.pt"


def save_checkpoint(folder: str | Path, *, spec: ModelSpec, model: torch.nn.Module, ema_model, deploy: str,
                    state: dict, categories: list[dict] | None = None) -> None:
    """Write everything a resumed run needs. state holds optimizer/schedule/scaler state dicts, epoch, ...

    categories: [{"id", "name"}] in label order, written beside the spec for prediction.
    """
    folder = Path(folder)
    _save_weights(model, folder / RAW_WEIGHTS)
    if ema_model is not None:
        _save_weights(ema_model, folder / EMA_WEIGHTS)
    (folder / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=2))
    if categories is not None:
        (folder / CATEGORIES_FILE).write_text(json.dumps(categories, indent=2))
    weights = EMA_WEIGHTS if deploy == "ema" and ema_model is not None else RAW_WEIGHTS
    (folder / MODEL_FILE).write_text(json.dumps({"weights": weights, "epoch": state["epoch"]}))
    # The model's CUDA generator too: drop-path on a GPU draws from it, and a resumed run repeats an
    # uninterrupted one. The model's device, not the current one, which a worker need not have set.
    device = next(model.parameters()).device
    cuda_rng = {"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}
    torch.save({**state, "rng": torch.get_rng_state(), **cuda_rng}, folder / STATE_FILE)


def load_checkpoint(folder: str | Path, *, model: torch.nn.Module, ema_model) -> dict:
    """Load weights into model (and ema_model) and return the rest of the state; no pickled code runs."""
    folder = Path(folder)
    model.load_state_dict(load_file(str(folder / RAW_WEIGHTS)))
    if ema_model is not None:
        # A run that starts keeping an EMA from a checkpoint without one starts it from the raw weights.
        source = folder / EMA_WEIGHTS if (folder / EMA_WEIGHTS).is_file() else folder / RAW_WEIGHTS
        ema_model.load_state_dict(load_file(str(source)))
    # On the CPU first: rank 0 saved CUDA tensors tagged cuda:0, and without map_location every resumed
    # rank would materialise them on GPU 0. optimizer.load_state_dict then moves them to each rank's own device.
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    torch.set_rng_state(state.pop("rng"))
    cuda_rng, device = state.pop("cuda_rng", None), next(model.parameters()).device
    if cuda_rng is not None and device.type == "cuda":  # a GPU run resumed on CPU has no CUDA generator to set
        torch.cuda.set_rng_state(cuda_rng, device)
    return state


def load_model(folder: str | Path) -> tuple[torch.nn.Module, ModelSpec]:
    """Rebuild the model a checkpoint deploys (in eval mode) and its spec."""
    folder = Path(folder)
    spec = ModelSpec.from_dict(json.loads((folder / SPEC_FILE).read_text()), where=str(folder / SPEC_FILE))
    weights = json.loads((folder / MODEL_FILE).read_text())["weights"]
    model = build_model(spec)
    model.load_state_dict(load_file(str(folder / weights)))
    return model.eval(), spec


def _save_weights(model: torch.nn.Module, path: Path) -> None:
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))


def categories_of(split: SplitIndex) -> list[dict]:
    """A SplitIndex's categories in label order, as categories.json holds them."""
    return [{"id": int(c), "name": n} for c, n in zip(split.category_ids, split.category_names)]
