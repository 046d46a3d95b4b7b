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


# The paper's constants, as one compound-space trial.
PAPER = {"alpha": 1.2, "beta": 1.1, "fpn_width_base": 64, "fpn_width_growth": 1.35, "fpn_depth_base": 3,
         "fpn_depth_slope": 1.0, "head_depth_base": 3}


@pytest.mark.parametrize("phi, resolution, channels, cells", [(0.0, 512, 64, 3), (1.0, 640, 88, 4),
                                                              (2.0, 768, 120, 5), (3.0, 768, 160, 6)])
def test_compound_at_the_papers_constants_gives_the_papers_bifpn_and_resolution(phi, resolution, channels, cells):
    """D0..D3 (paper Table 1): BiFPN 64/88/112/160 channels x 3/4/5/6 cells, 512/640/768/896 px, heads 3 (4 from
    phi = 3). Two differences, both from rules applied as written: at phi = 2 the paper rounds 64 * 1.35^2 =
    116.6 by hand to 112, where multiples of 8 give 120; and resolution follows gamma^phi (the constraint's
    rule), 512 * 1.17^3 = 827 -> 768 px at phi = 3, where the paper's linear 512 + 128 phi gives 896."""
    from spaces.compound import compound

    spec = _fixed(compound, {"phi": phi, **PAPER})
    assert (spec.image_size, spec.fpn_channels, spec.fpn_repeats) == (resolution, channels, cells)
    assert spec.head_repeats == 3 + int(phi // 3)
    assert (spec.backbone_width, spec.backbone_depth) == (round(1.1 ** phi, 3), round(1.2 ** phi, 3))


def test_compound_constraint_holds_on_a_thousand_sampled_trials():
    """gamma is derived, so alpha * beta^2 * gamma^2 = 2 for every proposal, and gamma >= 1 within the bounds."""
    from spaces.compound import FLOPS_GROWTH, CompoundBounds, gamma_of

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    bounds = CompoundBounds()
    for _ in range(1000):
        trial = study.ask()
        SPACES["compound"](trial)
        alpha, beta = trial.params["alpha"], trial.params["beta"]
        assert bounds.alpha[0] <= alpha <= bounds.alpha[1] and bounds.beta[0] <= beta <= bounds.beta[1]
        gamma = gamma_of(alpha, beta)
        assert alpha * beta ** 2 * gamma ** 2 == pytest.approx(FLOPS_GROWTH) and gamma >= 1.0
        study.tell(trial, 0.0)


def test_compound_cpu_bounds_stay_cheap_and_at_p5():
    from spaces import make_space

    space = make_space("compound", {"preset": "cpu"})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(30):
        trial = study.ask()
        spec = ModelSpec.from_dict({**space(trial)["spec"], "num_classes": 3})
        assert spec.backbone_family == "efficientnet_lite" and spec.max_level == 5
        assert 160 <= spec.image_size <= 224 and model_cost(spec).gflops < 0.2
        study.tell(trial, 0.0)


def test_compound_holds_a_pretrained_backbone_and_searches_the_rest():
    from spaces.compound import compound

    spec = _fixed(lambda t: compound(t, backbone=("efficientnet", 1.0, 1.0)), {"phi": 1.0, **PAPER})
    assert (spec.backbone_width, spec.backbone_depth, spec.fpn_channels) == (1.0, 1.0, 88)


@pytest.mark.parametrize("bounds, message", [
    ({"phi": [2, 1]}, "job.search.bounds.phi: low 2.0 is above high 1.0"),
    ({"preset": "tpu"}, "job.search.bounds.preset: must be one of gpu, cpu, got 'tpu'"),
    ({"phy": [0, 1]}, "job.search.bounds.phy: unknown key"),
    ({"alpha": [1.0, 1.6]}, "job.search.bounds.alpha, beta: alpha * beta^2 reaches 2.304"),
    ({"beta": [0.9, 1.1]}, "job.search.bounds.beta: must be >= 1"),
    ({"phi": "wide"}, "job.search.bounds.phi: must be a list of 2 values, got 'wide'"),
])
def test_bad_compound_bounds_name_the_key(bounds, message):
    from spaces import make_space
    from trainers.typed import ConfigError

    with pytest.raises(ConfigError) as err:
        make_space("compound", bounds)
    assert message in str(err.value)


def test_the_rule_is_the_papers_constants_clamped_into_the_bounds():
    from spaces.compound import BOUNDS_PRESETS, rule_params

    assert rule_params(1.0, BOUNDS_PRESETS["gpu"]) == {"phi": 1.0, **PAPER}
    cpu = rule_params(0.25, BOUNDS_PRESETS["cpu"])
    # The CPU BiFPN tops out at 48 channels, 2 cells and 2 head repeats; alpha, beta and the growth fit as they are.
    assert cpu == {"phi": 0.25, **PAPER, "fpn_width_base": 48, "fpn_depth_base": 2, "head_depth_base": 2}


def test_enqueued_rule_points_build_the_rule_in_the_space():
    from spaces import enqueued_params, make_space

    points = enqueued_params("compound", ["rule:0", "rule:1", {"phi": 0.5, "alpha": 1.3}], {"preset": "cpu"})
    space = make_space("compound", {"preset": "cpu"})
    specs = [_fixed(space, {**PAPER, **point}) for point in points[:2]]
    assert [(s.image_size, s.fpn_channels, s.fpn_repeats) for s in specs] == [(160, 48, 2), (192, 64, 3)]
    assert points[2] == {"phi": 0.5, "alpha": 1.3}
