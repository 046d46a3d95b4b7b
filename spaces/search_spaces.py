"""Define-by-run search spaces, each a function of an optuna.Trial that returns {"spec": {...}} (and "train")."""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import optuna

from spaces.bifpn import bifpn, bifpn_bounds
from spaces.bifpn import preset_params as bifpn_preset_params
from spaces.compound import compound, compound_bounds, rule_params
from spaces.detector import detector, detector_bounds
from spaces.presets import PRESETS, preset
from spaces.training import training, training_bounds
from trainers.spec import ModelSpec
from trainers.typed import ConfigError

Space = Callable[..., dict[str, Any]]
# (backbone_family, width, depth) of a pretrained backbone: the space then keeps the backbone at that size,
# since ImageNet weights exist only for the standard sizes, and searches everything else.
FixedBackbone = tuple[str, float, float]


def scaled_anchor(image_size: int) -> float:
    # effdet's anchor_scale=4 suits 512-640 px inputs; smaller inputs need proportionally smaller anchors,
    # or most objects match no anchor at IoU 0.5 (DESIGN.md: 56% unmatched at 128 px).
    return round(6.0 * image_size / 512, 3)


# EfficientNet's compound-scaling constants: depth alpha, width beta, resolution gamma (alpha * beta^2 * gamma^2 ~ 2).
ALPHA, BETA, GAMMA = 1.2, 1.1, 1.15


def lite_cpu(trial: optuna.Trial, backbone: FixedBackbone | None = None) -> dict[str, Any]:
    """EfficientDet-Lite below D0, sized so every configuration trains in 1-4 minutes on 2 CPU cores.

    One compound coefficient phi scales backbone width, depth and input resolution together, from a base of
    width 0.5, depth 0.5 at 160 px; the BiFPN's width and depth are searched beside it. phi stops at 1.0
    (192 px): measured beside another trial on 2 cores, a phi=1.5 trial took 58 s an epoch and a 224 px
    one 80 s, against 35 s at phi=1.0. Levels stop at P5: at these inputs P6/P7 are 1-2 px maps whose
    BatchNorm statistics are noise (DESIGN.md).
    """
    phi = trial.suggest_float("phi", 0.0, 1.0, step=0.5)
    image_size = 32 * round(160 * GAMMA**phi / 32)
    family, width, depth = backbone or ("efficientnet_lite", round(0.5 * BETA**phi, 3), round(0.5 * ALPHA**phi, 3))
    spec = {
        "backbone_family": family,
        "backbone_width": width,
        "backbone_depth": depth,
        "image_size": image_size,
        "fpn_channels": trial.suggest_int("fpn_channels", 32, 64, step=16),
        "fpn_repeats": trial.suggest_int("fpn_repeats", 1, 3),
        "head_repeats": 2,
        "min_level": 3,
        "max_level": 5,
        "anchor_scale": scaled_anchor(image_size),
        "fusion": "fastattn",
        # effdet's 0.01 momentum barely moves in a few hundred CPU steps (DESIGN.md).
        "bn_momentum": 0.1,
        "drop_path_rate": 0.1,  # effdet's own EfficientDet-Lite value
    }
    return {"spec": spec}


# lite_cpu's reference point: EfficientDet-Lite at 192 px with a BiFPN of 48 channels x 2 cells (0.10 GFLOPs), the
# model that the tests and benchmarks train wherever they need one CPU-sized model that learns.
LITE_CPU_REFERENCE = {"phi": 1.0, "fpn_channels": 48, "fpn_repeats": 2}


def lite_cpu_reference(num_classes: int) -> ModelSpec:
    """The ModelSpec of LITE_CPU_REFERENCE for `num_classes` classes."""
    return ModelSpec.from_dict({**lite_cpu(optuna.trial.FixedTrial(LITE_CPU_REFERENCE))["spec"],
                                "num_classes": num_classes})


def efficientdet(trial: optuna.Trial, backbone: FixedBackbone | None = None) -> dict[str, Any]:
    """The paper's compound-scaling family around D0..D3, for GPU clusters."""
    image_size = trial.suggest_int("image_size", 384, 896, step=128)
    family, width, depth = backbone or (
        trial.suggest_categorical("backbone_family", ["efficientnet", "efficientnet_lite"]),
        trial.suggest_float("backbone_width", 0.75, 1.2, step=0.05),
        trial.suggest_float("backbone_depth", 0.75, 1.4, step=0.05))
    spec = {
        "backbone_family": family,
        "backbone_width": width,
        "backbone_depth": depth,
        "image_size": image_size,
        "fpn_channels": trial.suggest_int("fpn_channels", 48, 160, step=16),
        "fpn_repeats": trial.suggest_int("fpn_repeats", 2, 6),
        "head_repeats": trial.suggest_int("head_repeats", 2, 4),
        "min_level": 3,
        "max_level": 7,
        "anchor_scale": 4.0,
        "fusion": trial.suggest_categorical("fusion", ["fastattn", "sum"]),
    }
    return {"spec": spec}


# Model spaces each propose a whole model; `training` proposes how it trains, beside exactly one of them.
MODEL_SPACES: dict[str, Space] = {"compound": compound, "bifpn": bifpn, "lite_cpu": lite_cpu,
                                  "efficientdet": efficientdet}
# The others compose beside exactly one model space: how it trains, and which detector parts it is built with.
SPACES: dict[str, Space] = {**MODEL_SPACES, "training": training, "detector": detector}
# The spaces that take bounds, and how each reads them.
_BOUNDS = {"compound": compound_bounds, "bifpn": bifpn_bounds, "training": training_bounds,
           "detector": detector_bounds}


class ComposedSpace:
    """Several spaces as one: each suggests its own parameters on the same trial, and their dicts merge section by
    section ({"spec": ..., "train": ...}). A class, not a closure: Tune pickles the searcher and its space."""

    def __init__(self, parts: list[tuple[str, Space]]):
        self.parts = parts

    def __call__(self, trial: optuna.Trial, backbone: FixedBackbone | None = None) -> dict[str, Any]:
        merged: dict[str, dict[str, Any]] = {}
        for name, part in self.parts:
            proposed = part(trial, backbone=backbone) if name in MODEL_SPACES and backbone else part(trial)
            for section, values in proposed.items():
                merged.setdefault(section, {}).update(values)
        return merged


def space_names(space: str | list[str], where: str = "job.search.space") -> list[str]:
    """The names a job's search.space composes: one model space, and optionally training and detector beside it."""
    names = [space] if isinstance(space, str) else list(space) if isinstance(space, (list, tuple)) else None
    if not names or not all(isinstance(name, str) for name in names):
        raise ConfigError(f"{where}: expected a space name or a list of them, got {space!r}")
    for name in names:
        if name not in SPACES:
            raise ConfigError(f"{where}: unknown space {name!r} (known: {', '.join(SPACES)})")
    if len(set(names)) < len(names):
        raise ConfigError(f"{where}: {names} names a space twice")
    models = [name for name in names if name in MODEL_SPACES]
    if len(models) != 1:
        raise ConfigError(f"{where}: {names} must hold exactly one model space ({', '.join(MODEL_SPACES)}); "
                          f"training and detector search how that model trains and which parts it has, "
                          f"e.g. [compound, detector, training]")
    return names


def make_space(space: str | list[str], bounds: dict | None = None) -> Space:
    """The job's space, with its bounds: for one space, `bounds` are its own; for a list, `bounds` maps each
    space's name to its bounds."""
    names = space_names(space)
    bounds = bounds or {}
    if isinstance(space, str):
        per_space, where = {names[0]: bounds}, "job.search.bounds"
    else:
        stray = sorted(set(map(str, bounds)) - set(names))
        if stray:
            raise ConfigError(f"job.search.bounds.{stray[0]}: with several spaces, bounds are keyed by space name "
                              f"({', '.join(names)})")
        per_space, where = bounds, None
    parts = []
    for name in names:
        raw = per_space.get(name) or {}
        here = where or f"job.search.bounds.{name}"
        if name in _BOUNDS:
            parts.append((name, functools.partial(SPACES[name], bounds=_BOUNDS[name](raw, here))))
        elif raw:
            raise ConfigError(f"{here}: the {name} space takes no bounds (those that do: {', '.join(_BOUNDS)})")
        else:
            parts.append((name, SPACES[name]))
    return parts[0][1] if len(parts) == 1 else ComposedSpace(parts)


def warmup_bound(space: str | list[str], bounds: dict | None) -> tuple[float, float] | None:
    """The warmup_epochs range the training space samples, when the job searches it (it composes, so its bounds
    are keyed by name); None otherwise. The job checks it against train.epochs, which the space does not know."""
    if "training" not in space_names(space) or isinstance(space, str):
        return None
    return training_bounds((bounds or {}).get("training") or {}, "job.search.bounds.training").warmup_epochs


def space_label(space: str | list[str]) -> str:
    return space if isinstance(space, str) else " + ".join(space)


# A space may propose a parameter only on some branches (the detector space's box loss only with the anchor
# head): this many random draws see every branch of a few binary choices (a branch of probability 1/2 is
# missed with probability 2**-32).
PARAMETER_DRAWS = 32


def space_parameters(space: Space) -> dict[str, optuna.distributions.BaseDistribution]:
    """The space's parameters and their distributions, found by running it on throwaway trials."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # an in-memory study announces itself at INFO
    try:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    finally:
        optuna.logging.set_verbosity(verbosity)
    found: dict[str, optuna.distributions.BaseDistribution] = {}
    for _ in range(PARAMETER_DRAWS):
        trial = study.ask()
        space(trial)
        found.update(trial.distributions)
    return found


def fixed_value_problems(space: str | list[str], fixed: dict[str, Any], bounds: dict | None = None) -> list[str]:
    """What is wrong with holding the space's parameters at `fixed`: one "key: reason" line each."""
    return _value_problems(space_label(space), space_parameters(make_space(space, bounds)), fixed)


RULE_PREFIX = "rule:"
# EfficientDet-DN is the paper's rule at phi N (its Table 1 rounds the rule); D7x, a B7 backbone with P8 added,
# is no point of the rule, and stands at D7's phi.
PRESET_PHI = {name: (7.0 if name == "d7x" else float(name[1:])) for name in PRESETS}


def enqueued_params(space: str | list[str], entries: list, bounds: dict | None = None) -> list[dict[str, Any]]:
    """search.enqueue as parameter dicts, the first trials of a search. "rule:PHI" is the paper's scaling rule at
    PHI (needs the compound space). A preset d0..d7x is the space's point nearest that EfficientDet: in compound
    the rule at phi N, phi clamped into the bounds; in bifpn the preset's BiFPN channels and cells, head repeats,
    fusion and resolution, each clamped into the bounds, on the job's backbone. A mapping holds some of the
    space's parameters. The sampler picks every parameter a point leaves out. Two entries that land on the same
    point (d2 and d3 where the bounds stop below both) are an error that names them."""
    names = space_names(space)
    label = space_label(space)
    distributions = space_parameters(make_space(space, bounds))
    per_space = {names[0]: bounds or {}} if len(names) == 1 else (bounds or {})
    points: list[dict[str, Any]] = []
    for index, entry in enumerate(entries):
        where = f"job.search.enqueue[{index}]"
        if isinstance(entry, str) and entry.startswith(RULE_PREFIX):
            if "compound" not in names:
                raise ConfigError(f"{where}: {entry!r}: the scaling rule is a point of the compound space, not {label}")
            try:
                phi = float(entry[len(RULE_PREFIX):])
            except ValueError:
                raise ConfigError(f"{where}: {entry!r}: expected rule:PHI with a number, e.g. rule:0.5") from None
            try:
                point = rule_params(phi, compound_bounds(per_space.get("compound") or {}))
            except ConfigError as err:
                raise ConfigError(f"{where}: {err}") from None
        elif isinstance(entry, str) and entry.lower() in PRESETS:
            point = _preset_point(entry.lower(), names, per_space, where, label)
        elif isinstance(entry, dict) and entry:
            problems = _value_problems(label, distributions, entry)
            if problems:
                raise ConfigError(f"{where}.{problems[0]}")
            point = dict(entry)
        else:
            raise ConfigError(f"{where}: expected rule:PHI, a preset ({', '.join(PRESETS)}) or a mapping of "
                              f"parameter: value, got {entry!r}")
        if point in points:
            raise ConfigError(f"{where}: {entry!r} is the same point as job.search.enqueue[{points.index(point)}] "
                              f"within the job's bounds ({point}); leave one of them out")
        points.append(point)
    return points


def _preset_point(name: str, names: list[str], per_space: dict, where: str, label: str) -> dict[str, Any]:
    if "compound" in names:
        b = compound_bounds(per_space.get("compound") or {})
        low, high = b.phi
        # The grid point at or below the preset's phi (clamped into the bounds), so it stays inside them.
        phi = low + b.phi_step * math.floor((min(max(PRESET_PHI[name], low), high) - low) / b.phi_step + 1e-9)
        return rule_params(phi, b)
    if "bifpn" in names:
        return bifpn_preset_params(preset(name).to_dict(), bifpn_bounds(per_space.get("bifpn") or {}))
    raise ConfigError(f"{where}: {name!r}: presets are points of the compound and bifpn spaces, not {label}")


def _value_problems(name: str, distributions: dict, values: dict[str, Any]) -> list[str]:
    problems = []
    for key, value in values.items():
        distribution = distributions.get(key)
        if distribution is None:
            problems.append(f"{key}: not a parameter of the {name} space (its parameters: {', '.join(distributions)})")
        elif not _holds(distribution, value):
            problems.append(f"{key}: {value!r} is not one of the {name} space's values ({_describe(distribution)})")
    return problems


def _holds(distribution: optuna.distributions.BaseDistribution, value: Any) -> bool:
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return value in distribution.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(distribution, optuna.distributions.IntDistribution) and not isinstance(value, int):
        return False
    if not distribution.low <= value <= distribution.high:
        return False
    step = distribution.step
    return not step or abs((value - distribution.low) / step - round((value - distribution.low) / step)) < 1e-9


def _describe(distribution: optuna.distributions.BaseDistribution) -> str:
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return "one of " + ", ".join(map(str, distribution.choices))
    step = f" in steps of {distribution.step:g}" if distribution.step else ""
    return f"{distribution.low:g} to {distribution.high:g}{step}"
