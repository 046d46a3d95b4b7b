"""Loads ImageNet backbone weights from a local file: the reading and matching are ours, the modules timm's."""
from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from torch import nn

from trainers import backbones
from trainers.spec import STANDARD_BACKBONES, ModelSpec, SpecError
from trainers.typed import ConfigError

_FIELD = "model.backbone_weights"


# Checkpoints that wrap the state dict (timm's train script, many others), in the order they are tried.
_WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema")
# The classifier end of a full timm EfficientNet, which the features-only backbone does not have.
_CLASSIFIER_PREFIXES = ("conv_head.", "bn2.", "classifier.")

_Shapes = dict[str, tuple[int, ...]]


def read_backbone_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The backbone tensors of a .safetensors or torch file, unwrapped and without timm's classifier tensors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{_FIELD}: {path}: file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded = load_file(path, device="cpu")
        else:
            # weights_only: a weights file must never run pickled code.
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to decode is the same user error
        raise ConfigError(f"{_FIELD}: {path}: {_unreadable(path, err)}") from None
    tensors = _state_dict_in(loaded)
    if tensors is None:
        found = f"keys {sorted(map(str, loaded))[:8]}" if isinstance(loaded, Mapping) else type(loaded).__name__
        raise ConfigError(f"{_FIELD}: {path}: holds no tensors of a state dict (found {found})")
    tensors = _without_classifier(tensors)
    if not tensors:
        raise ConfigError(f"{_FIELD}: {path}: holds only classifier tensors, no backbone tensors")
    return tensors


def standard_backbone_of(weights: Mapping[str, torch.Tensor]) -> tuple[str, str, float, float] | None:
    """(name, family, width, depth) of the standard size whose backbone has exactly these tensor names and shapes."""
    shapes = _shapes(_without_classifier(weights))
    for name, (family, width, depth) in STANDARD_BACKBONES.items():
        if _standard_shapes(name) == shapes:
            return name, family, width, depth
    return None


def load_backbone_weights(model: nn.Module, spec: ModelSpec, path: str | Path) -> None:
    """Loads the file into model.backbone (BatchNorm statistics included), or names the spec field that differs."""
    weights = read_backbone_weights(path)
    expected = _shapes(model.backbone.state_dict())
    found = _shapes(weights)
    if found != expected:
        standard = standard_backbone_of(weights)
        raise SpecError(_mismatch_message(spec, Path(path).expanduser(), expected, found, standard))
    model.backbone.load_state_dict(weights, strict=True)


def _unreadable(path: Path, err: Exception) -> str:
    if "Weights only load failed" in str(err):
        return ("refused: it pickles objects other than tensors (a whole model, or code), which are never loaded; "
                "save the model's state_dict() instead, or convert the file to .safetensors")
    kind = "safetensors" if path.suffix == ".safetensors" else "torch"
    # torch's own messages for a non-torch file can be a bare number (a failed magic-number lookup).
    return f"not a readable {kind} weights file ({type(err).__name__}: {str(err).strip()[:200]})"


def _state_dict_in(loaded: object) -> dict[str, torch.Tensor] | None:
    if not isinstance(loaded, Mapping):
        return None
    if loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return dict(loaded)
    for key in _WRAPPER_KEYS:
        inner = loaded.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return dict(inner)
    return None


def _without_classifier(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in weights.items() if not k.startswith(_CLASSIFIER_PREFIXES)}


def _shapes(weights: Mapping[str, torch.Tensor]) -> _Shapes:
    return {k: tuple(v.shape) for k, v in weights.items()}


@functools.cache
def _standard_shapes(name: str) -> _Shapes:
    family, width, depth = STANDARD_BACKBONES[name]
    # As effdet's EfficientDet.__init__ creates it; drop path and BN momentum add no tensors, so they are left out.
    # On meta it takes no memory and 0.1-0.5 s, once per size.
    with torch.device("meta"):
        backbone = timm.create_model(backbones.BACKBONE_NAME, features_only=True, out_indices=(2, 3, 4),
                                     pretrained=False, family=family, width=width, depth=depth)
    return _shapes(backbone.state_dict())


def _mismatch_message(spec: ModelSpec, path: Path, expected: _Shapes, found: _Shapes,
                      standard: tuple[str, str, float, float] | None) -> str:
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    reshaped = [k for k in expected if k in found and expected[k] != found[k]]
    differences = [f"{len(missing)} tensors missing from the file, e.g. {missing[0]}"] if missing else []
    differences += [f"{len(unexpected)} unexpected, e.g. {unexpected[0]}"] if unexpected else []
    if standard is not None and standard[1] != spec.backbone_family:
        # The other family's blocks differ in name and shape alike; neither says anything about width or depth.
        fields = ["backbone_family"]
        reasons = [f"its tensors are those of the {standard[1]} family ({'; '.join(differences) or 'shapes differ'})"]
    else:
        fields, reasons = [], []
        if reshaped:
            first = reshaped[0]
            fields.append("backbone_width")
            reasons.append(f"{len(reshaped)} tensors differ in shape (backbone_width), e.g. {first} is "
                           f"{list(found[first])} in the file but {list(expected[first])} in the model")
        if differences:
            fields.append("backbone_depth")
            reasons.append(f"the blocks differ (backbone_depth): {'; '.join(differences)}")
    built = f"{spec.backbone_family}, width {spec.backbone_width}, depth {spec.backbone_depth}"
    message = f"{fields[0]}: {_FIELD} {path} does not fit the spec's backbone ({built}): {'; '.join(reasons)}"
    if standard is None:
        return (f"{message}. The file matches none of timm's standard sizes ({', '.join(STANDARD_BACKBONES)}); "
                "set backbone_family, backbone_width and backbone_depth to those it was trained with")
    name, family, width, depth = standard
    settings = [f"backbone_family: {family}"] if family != spec.backbone_family else []
    settings += [f"backbone_width: {width}", f"backbone_depth: {depth}"]
    return (f"{message}. The file holds {name} (family {family}, width {width}, depth {depth}); "
            f"set {', '.join(settings)} to use it")
