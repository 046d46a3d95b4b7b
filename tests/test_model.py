"""The spec -> effdet builder, the FLOPs count, and the presets against the EfficientDet paper."""
import json

import pytest
import timm
import torch

from search.cli import main
from spaces import PRESETS, preset
from trainers.backbones import BACKBONE_NAME
from trainers.cost import model_cost, model_shape
from trainers.model import build_model, effdet_config
from trainers.spec import ModelSpec

SMALL = ModelSpec(num_classes=4, backbone_family="efficientnet_lite", backbone_width=0.5, backbone_depth=0.5,
                  image_size=128, max_level=5, anchor_scale=1.5, fpn_channels=32, fpn_repeats=1, head_repeats=2)

# The EfficientDet paper's Table 2: params (M) and FLOPs (B multiply-adds).
PAPER = {"d0": (3.9, 2.5), "d1": (6.6, 6.1), "d2": (8.1, 11), "d3": (12, 25), "d4": (21, 55),
         "d5": (34, 135), "d6": (52, 226), "d7": (52, 325)}


def test_timm_registers_our_generator():
    # A timm upgrade that renames _gen_efficientnet* or changes register_model fails here, loudly.
    assert BACKBONE_NAME in timm.list_models()
    backbone = timm.create_model(BACKBONE_NAME, family="efficientnet_lite", width=0.5, depth=0.5,
                                 features_only=True, out_indices=(2, 3, 4))
    assert [f["reduction"] for f in backbone.feature_info.get_dicts()] == [8, 16, 32]


def test_builder_outputs_per_level_maps():
    model = build_model(SMALL).eval()
    with torch.no_grad():
        classes, boxes = model(torch.randn(2, 3, 128, 128))
    anchors = 9  # 3 scales x 3 aspect ratios
    assert [tuple(c.shape) for c in classes] == [(2, anchors * 4, s, s) for s in (16, 8, 4)]
    assert [tuple(b.shape) for b in boxes] == [(2, anchors * 4, s, s) for s in (16, 8, 4)]


def test_config_carries_the_spec():
    config = effdet_config(SMALL)
    assert (config.fpn_channels, config.fpn_cell_repeats, config.box_class_repeats) == (32, 1, 2)
    assert config.act_type == "relu6" and config.fpn_name == "bifpn_fa"
    assert config.backbone_args == {"family": "efficientnet_lite", "width": 0.5, "depth": 0.5,
                                    "drop_path_rate": 0.2, "bn_momentum": 0.01}


def test_width_and_depth_change_the_backbone():
    base = model_cost(SMALL)
    wider = model_cost(SMALL.replace(backbone_width=1.0))
    deeper = model_cost(SMALL.replace(backbone_depth=1.0))
    bigger_input = model_cost(SMALL.replace(image_size=256))
    assert wider.params > base.params and deeper.params > base.params
    assert bigger_input.params == base.params
    # FLOPs of a conv net scale with the pixel count: 4x the pixels, ~4x the multiply-adds.
    assert bigger_input.gflops / base.gflops == pytest.approx(4.0, rel=0.05)


def test_specs_that_round_to_one_network_share_its_architecture_name():
    """timm rounds width to channels (multiples of 8) and depth to whole blocks (ceil of the total), so a width
    within one rounding builds the same network; a wider backbone or one more block does not."""
    name = model_cost(SMALL).architecture
    assert model_cost(SMALL.replace(backbone_width=0.505)).architecture == name
    assert model_cost(SMALL.replace(backbone_width=0.75)).architecture != name
    # 16 blocks x 0.501 = 8.016, rounded up to 9 blocks where 0.5 makes 8.
    assert model_cost(SMALL.replace(backbone_depth=0.501)).architecture != name
    assert model_cost(SMALL.replace(fpn_channels=40)).architecture != name


def test_flops_count_multiply_adds_once():
    # A single 3x3 conv, 8->16 channels on 32x32 with padding: 16*8*9*32*32 multiply-adds.
    conv = torch.nn.Conv2d(8, 16, 3, padding=1, bias=False)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        conv(torch.randn(1, 8, 32, 32))
    assert counter.get_total_flops() / 2 == 16 * 8 * 9 * 32 * 32


@pytest.mark.parametrize("name", sorted(PAPER))
def test_presets_match_the_paper(name):
    params_m, gflops = PAPER[name]
    cost = model_cost(preset(name))
    assert cost.params_m == pytest.approx(params_m, rel=0.03)
    assert cost.gflops == pytest.approx(gflops, rel=0.03)


@pytest.mark.parametrize("name", PRESETS)
def test_describe_prints_params_gflops_and_size(name, capsys):
    assert main(["describe", name, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    spec = preset(name)
    assert info["image_size"] == spec.image_size
    cost = model_cost(spec)
    assert info["params"] == cost.params and info["gflops"] == pytest.approx(cost.gflops, rel=1e-3)


def test_describe_reads_a_spec_file(tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text("num_classes: 4\nimage_size: 128\nmax_level: 5\nbackbone_family: efficientnet_lite\n")
    assert main(["describe", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["image_size"] == 128
    path.write_text("num_classes: 4\nimage_size: 100\n")
    assert main(["describe", str(path)]) == 2
    assert "image_size: must be a positive multiple" in capsys.readouterr().err


def test_describe_takes_num_classes_for_a_spec_file_and_refuses_a_job_file(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("image_size: 128\nmax_level: 5\nbackbone_family: efficientnet_lite\n")
    assert main(["describe", str(spec), "--num-classes", "3", "--json"]) == 0  # it said num_classes was missing
    assert json.loads(capsys.readouterr().out)["spec"]["num_classes"] == 3
    spec.write_text("num_classes: 3\nimage_size: 128\nmax_level: 5\nbackbone_family: efficientnet_lite\n")
    assert main(["describe", str(spec), "--num-classes", "5", "--json"]) == 0  # it described 3 classes
    assert json.loads(capsys.readouterr().out)["spec"]["num_classes"] == 5
    job = tmp_path / "job.yaml"
    job.write_text("name: t\ndata: {train: {annotations: a.json, images: i}}\nsearch: {trials: 2}\n")
    assert main(["describe", str(job)]) == 2
    assert capsys.readouterr().err == (f"effsearch: error: {job} is a job file; describe takes a preset (d0, d1, d2, "
                                       "d3, d4, d5, d6, d7, d7x) or a model spec file (the fields of "
                                       "trainers/spec.py's ModelSpec)\n")


def test_backbone_keeps_effdet_stochastic_depth_and_takes_the_spec_bn_momentum():
    from timm.layers import DropPath

    spec = SMALL.replace(bn_momentum=0.1, drop_path_rate=0.3)
    model = build_model(spec)
    # timm spreads drop_path_rate linearly over the blocks, reaching it at the last one.
    rates = [m.drop_prob for m in model.backbone.modules() if isinstance(m, DropPath)]
    assert rates and max(rates) == pytest.approx(0.3, rel=0.2) and min(rates) > 0
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert sum(1 for n, m in model.named_modules() if n.startswith("backbone") and m in norms) > 10
    assert {m.momentum for m in norms} == {0.1}  # backbone, BiFPN and heads alike


def test_a_spec_is_counted_once_and_an_equal_spec_reuses_the_count():
    """A trial checks its budget and then trains, and both want the count: the second is the cached one."""
    spec = SMALL.replace(fpn_channels=56)
    before = model_cost.cache_info()
    first = model_cost(spec)
    assert model_cost(SMALL.replace(fpn_channels=56)) is first  # an equal spec, built anew
    after = model_cost.cache_info()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 1)
    assert model_cost(spec.replace(fpn_channels=64)) is not first


def test_the_shape_without_the_count_names_the_same_network_and_parameters():
    for spec in (SMALL, SMALL.replace(backbone_width=0.505), SMALL.replace(fpn_repeats=2)):
        shape, cost = model_shape(spec), model_cost(spec)
        assert (shape.params, shape.architecture) == (cost.params, cost.architecture)
        assert not hasattr(shape, "gflops")
