"""Every search space, exercised with optuna's FixedTrial; the presets table; the FLOPs budget."""
import optuna
import pytest

from spaces import MODEL_SPACES, PRESETS, SPACES, OverBudget, check_budget, preset
from spaces.search_spaces import lite_cpu
from trainers.cost import model_cost
from trainers.spec import ModelSpec


def _fixed(space, trial_values):
    return ModelSpec.from_dict({**space(optuna.trial.FixedTrial(trial_values))["spec"], "num_classes": 3})


@pytest.mark.parametrize("name", sorted(MODEL_SPACES))
def test_every_model_space_yields_valid_specs(name):
    sampler = optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(sampler=sampler)
    for _ in range(20):
        trial = study.ask()
        spec = ModelSpec.from_dict({**MODEL_SPACES[name](trial)["spec"], "num_classes": 3})
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
    assert gflops == pytest.approx(model_cost(spec).gflops)  # what the budget is held to: the counted FLOPs
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
    # Stepped ranges that do not end on a step: Optuna would move the upper end without a word.
    ({"phi": [0, 2.8]}, "job.search.bounds.phi: 2.8 - 0 is not a whole number of steps of 0.5"),
    ({"fpn_depth_slope": [0.5, 1.4]}, "job.search.bounds.fpn_depth_slope: 1.4 - 0.5 is not a whole number"),
    ({"fpn_width_base": [48, 100]}, "job.search.bounds.fpn_width_base: 100 - 48 is not a whole number of steps of 8"),
    # Beyond what the model accepts, at a corner of the box: refused here, not at a proposal after Ray started.
    ({"phi": [0, 8]}, "job.search.bounds.phi, beta, base_width: the space reaches a model that is refused, at phi 8, "
                      "alpha 1.35, beta 1.2"),
    ({"phi": [0, 6]}, "backbone_depth: must be in [0.1, 6], got 6.053"),
    ({"phi": [0, 7], "alpha": [1.0, 1.1], "beta": [1.0, 1.05]},
     "job.search.bounds.phi, alpha, beta, base_resolution, max_level: the space reaches a model that is refused, at "
     "phi 7, alpha 1.1, beta 1.05, "),
    ({"fpn_width_base": [48, 400]}, "job.search.bounds.phi, fpn_width_base, fpn_width_growth: "),
    ({"preset": "cpu", "base_width": 0.05}, "backbone_width: must be in [0.1, 4], got 0.05"),
    ({"max_level": 9}, "job.search.bounds.max_level: the space reaches a model that is refused"),
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


BIFPN_POINT = {"image_size": 192, "fpn_channels": 40, "fpn_repeats": 2, "head_repeats": 3, "fusion": "sum"}
TRAINING_POINT = {"lr": 0.005, "weight_decay": 3e-4, "warmup_epochs": 1.25, "batch_size": 8, "focal_gamma": 2.0,
                  "focal_alpha": 0.3}


def test_bifpn_searches_the_bifpn_heads_fusion_and_resolution_over_the_chosen_backbone():
    from spaces import make_space

    space = make_space("bifpn", {"preset": "cpu", "backbone_width": 0.75})
    spec = _fixed(space, BIFPN_POINT)
    assert (spec.image_size, spec.fpn_channels, spec.fpn_repeats, spec.head_repeats, spec.fusion) == \
        (192, 40, 2, 3, "sum")
    assert (spec.backbone_family, spec.backbone_width, spec.backbone_depth) == ("efficientnet_lite", 0.75, 0.5)
    # The CPU preset keeps P3-P5 and scales anchors with the input (6 R / 512), as lite_cpu does.
    assert spec.max_level == 5 and spec.anchor_scale == pytest.approx(6 * 192 / 512)
    # A pretrained backbone replaces the bounds' one.
    held = _fixed(lambda t: space(t, backbone=("efficientnet_lite", 1.0, 1.0)), BIFPN_POINT)
    assert (held.backbone_width, held.backbone_depth) == (1.0, 1.0)


def test_bifpn_channels_are_multiples_of_eight_and_every_sample_is_within_its_bounds():
    from spaces import make_space
    from spaces.bifpn import BifpnBounds

    bounds = BifpnBounds()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(200):
        trial = study.ask()
        spec = ModelSpec.from_dict({**make_space("bifpn")(trial)["spec"], "num_classes": 3})
        assert spec.fpn_channels % 8 == 0 and bounds.fpn_channels[0] <= spec.fpn_channels <= bounds.fpn_channels[1]
        assert spec.image_size % 128 == 0 and 384 <= spec.image_size <= 896
        assert 2 <= spec.fpn_repeats <= 6 and 2 <= spec.head_repeats <= 4 and spec.fusion in ("fastattn", "sum")
        study.tell(trial, 0.0)


def test_training_space_proposes_train_settings_and_the_focal_loss():
    from spaces import make_space

    proposed = make_space(["lite_cpu", "training"])(
        optuna.trial.FixedTrial({"phi": 0.5, "fpn_channels": 48, "fpn_repeats": 2, **TRAINING_POINT}))
    assert proposed["train"] == {"lr": 0.005, "weight_decay": 3e-4, "warmup_epochs": 1.25, "batch_size": 8}
    spec = ModelSpec.from_dict({**proposed["spec"], "num_classes": 3})
    assert (spec.focal_gamma, spec.focal_alpha, spec.fpn_channels) == (2.0, 0.3, 48)
    # lr and weight decay are searched on a log scale: their orders of magnitude matter, not their digits.
    from spaces.search_spaces import space_parameters

    distributions = space_parameters(make_space(["lite_cpu", "training"]))
    assert distributions["lr"].log and distributions["weight_decay"].log
    assert distributions["batch_size"].choices == (8, 16, 32)


def test_a_trial_trains_with_its_searched_settings_in_place_of_the_jobs():
    from search.trainable import trial_recipe
    from trainers.recipe import TrainConfig

    job_recipe = TrainConfig(epochs=3, lr=0.02, batch_size=16)
    recipe = trial_recipe(job_recipe, {"spec": {}, "train": {"lr": 0.005, "batch_size": 8}})
    assert (recipe.lr, recipe.batch_size, recipe.epochs) == (0.005, 8, 3)
    assert trial_recipe(job_recipe, {"spec": {}}) is job_recipe


def test_composed_spaces_share_no_parameter_and_no_spec_field():
    """Each model space beside training: the parameter names are disjoint, and training's spec fields (the focal
    loss) are ones no model space sets, so merging loses nothing."""
    from spaces import make_space
    from spaces.search_spaces import space_parameters

    training = space_parameters(make_space(["lite_cpu", "training"])).keys() - \
        space_parameters(make_space("lite_cpu")).keys()
    for name in MODEL_SPACES:
        model = space_parameters(make_space(name))
        assert not model.keys() & training, name
        composed = make_space([name, "training"])
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
        proposed = composed(trial)
        assert set(trial.params) == model.keys() | training
        alone = MODEL_SPACES[name](optuna.trial.FixedTrial({k: trial.params[k] for k in model}))["spec"]
        assert proposed["spec"] == {**alone, "focal_gamma": trial.params["focal_gamma"],
                                    "focal_alpha": trial.params["focal_alpha"]}


@pytest.mark.parametrize("space, bounds, message", [
    ("training", {}, "job.search.space: ['training'] must hold exactly one model space"),
    (["bifpn", "compound"], {}, "must hold exactly one model space"),
    (["bifpn", "bifpn"], {}, "job.search.space: ['bifpn', 'bifpn'] names a space twice"),
    (["bifpn", "traning"], {}, "job.search.space: unknown space 'traning'"),
    ("bifpn", {"fpn_channels": [24, 60]}, "job.search.bounds.fpn_channels: must be multiples of 8"),
    ("bifpn", {"image_size": [128, 250], "preset": "cpu"}, "job.search.bounds.image_size: 250 - 128 is not a whole "
                                                           "number of steps of 32"),
    ("bifpn", {"fusions": ["fast"]}, "job.search.bounds.fusions: must be distinct values among fastattn, attn, sum"),
    ("bifpn", {"image_size": [100, 228], "preset": "cpu"}, "job.search.bounds.image_size, image_step: must be "
                                                           "multiples of 2**max_level = 32"),
    ("bifpn", {"backbone_family": "resnet"}, "job.search.bounds.backbone_family: must be one of"),
    # Beyond what the model accepts: refused here, not at the first proposal after Ray has started.
    ("bifpn", {"image_size": [384, 4096]}, "job.search.bounds.image_size: must be <= 2048, got 4096"),
    ("bifpn", {"fpn_repeats": [2, 20]}, "job.search.bounds.fpn_repeats: must be in [1, 12], got 20"),
    ("bifpn", {"drop_path_rate": 1.0}, "job.search.bounds.drop_path_rate: must be in [0, 1), got 1.0"),
    ("bifpn", {"preset": ["cpu"]}, "job.search.bounds.preset: must be one of gpu, cpu, got ['cpu']"),
    (["bifpn", "training"], {"training": {"lr": [0.0, 0.1]}}, "job.search.bounds.training.lr: must be > 0"),
    (["bifpn", "training"], {"training": {"batch_size": [8, 8]}}, "job.search.bounds.training.batch_size: must be "
                                                                    "distinct integers"),
    (["bifpn", "training"], {"training": {"focal_alpha": [0.2, 1.0]}}, "job.search.bounds.training.focal_alpha: "
                                                                         "must lie in (0, 1)"),
    (["bifpn", "training"], {"training": {"preset": "cpu"}}, "job.search.bounds.training.preset: this space has "
                                                               "no presets"),
    (["bifpn", "training"], {"training": {"momentum": [0, 1]}}, "job.search.bounds.training.momentum: unknown key"),
    (["bifpn", "training"], {"lr": [0.001, 0.01]}, "job.search.bounds.lr: with several spaces, bounds are keyed "
                                                    "by space name (bifpn, training)"),
    (["lite_cpu", "training"], {"lite_cpu": {"phi": [0, 1]}}, "job.search.bounds.lite_cpu: the lite_cpu space "
                                                                "takes no bounds"),
])
def test_bad_space_names_and_bounds_name_the_key(space, bounds, message):
    from spaces import make_space
    from trainers.typed import ConfigError

    with pytest.raises(ConfigError) as err:
        make_space(space, bounds)
    assert message in str(err.value)


def test_presets_enqueue_as_the_nearest_point_within_the_bounds():
    from spaces import enqueued_params, make_space
    from trainers.typed import ConfigError

    # bifpn in its GPU bounds holds D0..D3 as they are; training parameters are left to the sampler.
    points = enqueued_params(["bifpn", "training"], ["d0", "d1", "d3"])
    assert points == [{"image_size": 512, "fpn_channels": 64, "fpn_repeats": 3, "head_repeats": 3, "fusion": "fastattn"},
                      {"image_size": 640, "fpn_channels": 88, "fpn_repeats": 4, "head_repeats": 3, "fusion": "fastattn"},
                      {"image_size": 896, "fpn_channels": 160, "fpn_repeats": 6, "head_repeats": 4,
                       "fusion": "fastattn"}]
    # D6's sum fusion is kept where the bounds allow it; its 1280 px, 384 channels and 8 cells are clamped.
    (d6,) = enqueued_params("bifpn", ["D6"])
    assert d6 == {"image_size": 896, "fpn_channels": 160, "fpn_repeats": 6, "head_repeats": 4, "fusion": "sum"}
    # In compound, DN is the paper's rule at phi N (its Table 1 rounds the rule), phi clamped into the bounds.
    assert enqueued_params("compound", ["d1"]) == enqueued_params("compound", ["rule:1"])
    assert enqueued_params("compound", ["d7x"]) == enqueued_params("compound", ["rule:3"])  # phi stops at 3
    spec = _fixed(make_space("compound"), enqueued_params("compound", ["d1"])[0])
    assert (spec.image_size, spec.fpn_channels, spec.fpn_repeats) == (640, 88, 4)  # D1's
    # Two presets that land on one point within the bounds are named, not trained twice.
    with pytest.raises(ConfigError, match=r"job.search.enqueue\[2\]: 'd2' is the same point as "
                                          r"job.search.enqueue\[1\]"):
        enqueued_params("compound", ["d0", "d1", "d2"], {"preset": "cpu"})
    with pytest.raises(ConfigError, match=r"job.search.enqueue\[0\]: 'd0': presets are points of the compound and "
                                          r"bifpn spaces, not lite_cpu \+ training"):
        enqueued_params(["lite_cpu", "training"], ["d0"])
