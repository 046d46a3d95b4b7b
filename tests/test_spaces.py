"""Every search space, exercised with optuna's FixedTrial; the presets table; the FLOPs budget."""
import optuna
import pytest

from spaces import PRESETS, SPACES, OverBudget, check_budget, preset
from spaces.search_spaces import lite_cpu
from trainers.cost import model_cost
from trainers.spec import ModelSpec


def _fixed(space, trial_values):
    return ModelSpec.from_dict({**space(optuna.trial.FixedTrial(trial_values))["spec"], "num_classes": 3})


@pytest.mark.parametrize("name", sorted(SPACES))
def test_every_space_yields_valid_specs(name):
    sampler = optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(sampler=sampler)
    for _ in range(20):
        trial = study.ask()
        spec = ModelSpec.from_dict({**SPACES[name](trial)["spec"], "num_classes": 3})
        assert spec.image_size % 2 ** spec.max_level == 0
        study.tell(trial, 0.0)


def test_lite_cpu_compound_coefficient_scales_width_depth_and_resolution():
    small = _fixed(lite_cpu, {"phi": 0.0, "fpn_channels": 32, "fpn_repeats": 1})
    large = _fixed(lite_cpu, {"phi": 1.0, "fpn_channels": 32, "fpn_repeats": 1})
    assert (small.backbone_width, small.backbone_depth, small.image_size) == (0.5, 0.5, 160)
    assert large.backbone_width > small.backbone_width and large.backbone_depth > small.backbone_depth
    assert large.image_size == 192
    # Anchors shrink with the input (DESIGN.md), and P6/P7 are left out at these sizes.
    assert small.anchor_scale == pytest.approx(6 * 160 / 512) and small.max_level == 5


def test_lite_cpu_is_cheap_enough_for_a_cpu():
    # Every corner of the space stays under ~0.15 GMACs: 1-4 minutes of training on 2 cores (DESIGN.md).
    corners = [_fixed(lite_cpu, {"phi": p, "fpn_channels": c, "fpn_repeats": r})
               for p in (0.0, 1.0) for c in (32, 64) for r in (1, 3)]
    flops = [model_cost(s).gflops for s in corners]
    assert max(flops) < 0.15 and min(flops) > 0.02
    assert len({round(f, 4) for f in flops}) == len(flops)


def test_budget_rejects_before_training():
    spec = _fixed(lite_cpu, {"phi": 1.0, "fpn_channels": 64, "fpn_repeats": 3})
    gflops = check_budget(spec, None)
    assert check_budget(spec, gflops + 0.001) == pytest.approx(gflops)
    with pytest.raises(OverBudget, match="exceeds the budget of 0.05 GFLOPs"):
        check_budget(spec, 0.05)


def test_presets_are_ordered_by_cost():
    flops = [model_cost(preset(name)).gflops for name in PRESETS]
    assert flops == sorted(flops)
    with pytest.raises(KeyError, match="unknown preset 'd9'"):
        preset("d9")
