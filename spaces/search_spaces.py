"""Define-by-run search spaces: each is a function of an optuna.Trial that returns {"spec": {...}}."""
from __future__ import annotations

from typing import Any, Callable

import functools

import optuna

from spaces.compound import compound, compound_bounds, rule_params
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


SPACES: dict[str, Space] = {"lite_cpu": lite_cpu, "efficientdet": efficientdet, "compound": compound}


def make_space(name: str, bounds: dict | None = None) -> Space:
    """The named space, with the job file's bounds where the space takes them (compound)."""
    if name == "compound":
        return functools.partial(compound, bounds=compound_bounds(bounds or {}))
    if bounds:
        raise ConfigError(f"job.search.bounds: only the compound space takes bounds, not {name}")
    return SPACES[name]


def space_parameters(space: Space) -> dict[str, optuna.distributions.BaseDistribution]:
    """The space's parameters and their distributions, found by running it once on a throwaway trial."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # an in-memory study announces itself at INFO
    try:
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    finally:
        optuna.logging.set_verbosity(verbosity)
    space(trial)
    return dict(trial.distributions)


def fixed_value_problems(name: str, fixed: dict[str, Any], bounds: dict | None = None) -> list[str]:
    """What is wrong with holding the named space's parameters at `fixed`: one "key: reason" line each."""
    return _value_problems(name, space_parameters(make_space(name, bounds)), fixed)


RULE_PREFIX = "rule:"


def enqueued_params(name: str, entries: list, bounds: dict | None = None) -> list[dict[str, Any]]:
    """search.enqueue as parameter dicts, the first trials of a search: "rule:PHI" is the paper's scaling rule at
    PHI (compound space only), and a mapping holds some of the space's parameters (the sampler picks the rest)."""
    distributions = space_parameters(make_space(name, bounds))
    points = []
    for index, entry in enumerate(entries):
        where = f"job.search.enqueue[{index}]"
        if isinstance(entry, str) and entry.startswith(RULE_PREFIX):
            if name != "compound":
                raise ConfigError(f"{where}: {entry!r}: the scaling rule is a point of the compound space, not {name}")
            try:
                phi = float(entry[len(RULE_PREFIX):])
            except ValueError:
                raise ConfigError(f"{where}: {entry!r}: expected rule:PHI with a number, e.g. rule:0.5") from None
            try:
                points.append(rule_params(phi, compound_bounds(bounds or {})))
            except ConfigError as err:
                raise ConfigError(f"{where}: {err}") from None
        elif isinstance(entry, dict) and entry:
            problems = _value_problems(name, distributions, entry)
            if problems:
                raise ConfigError(f"{where}.{problems[0]}")
            points.append(dict(entry))
        else:
            raise ConfigError(f"{where}: expected rule:PHI or a mapping of parameter: value, got {entry!r}")
    return points


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
