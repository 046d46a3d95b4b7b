"""Local ImageNet backbone weights: timm checkpoints load into the spec's backbone, or the spec field is named."""
import pytest
import timm
import torch
from safetensors.torch import save_file

from spaces import preset
from trainers.model import build_model, build_on_meta
from trainers.pretrained import (STANDARD_BACKBONES, load_backbone_weights, read_backbone_weights,
                                 standard_backbone_of)
from trainers.spec import ModelSpec, SpecError
from trainers.typed import ConfigError

LITE0 = ModelSpec(num_classes=3, backbone_family="efficientnet_lite", backbone_width=1.0, backbone_depth=1.0,
                  image_size=256, max_level=5, anchor_scale=3.0)
B0_SMALL = ModelSpec(num_classes=3, image_size=256, max_level=5, anchor_scale=3.0)


def _marked_checkpoint(name):
    """timm's full classifier state dict, every tensor moved off timm's init so a load cannot pass vacuously."""
    generator = torch.Generator().manual_seed(0)
    state = timm.create_model(name, pretrained=False).state_dict()
    for key, value in state.items():
        if value.is_floating_point():
            state[key] = value + 0.1 * torch.randn(value.shape, generator=generator)
        else:
            state[key] = value + 1234  # num_batches_tracked
    return state


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{timm name: {format: path}}; the torch file wraps its tensors the way timm's train script does."""
    folder = tmp_path_factory.mktemp("weights")
    files = {}
    for name in ("efficientnet_b0", "efficientnet_lite0"):
        state = _marked_checkpoint(name)
        torch.save({"state_dict": state, "epoch": 450}, folder / f"{name}.pth")
        save_file(state, folder / f"{name}.safetensors")
        files[name] = {"pth": folder / f"{name}.pth", "safetensors": folder / f"{name}.safetensors"}
    return files


def _assert_loads(spec, path, reference):
    model = build_model(spec)
    file = read_backbone_weights(path)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    assert before.keys() == file.keys()
    assert not any(torch.equal(before[k], file[k]) for k in file), "a tensor already equals the file's"

    load_backbone_weights(model, spec, path)

    after = model.backbone.state_dict()
    unequal = [k for k in after if not torch.equal(after[k], file[k])]
    assert not unequal, f"not loaded: {unequal[:5]}"
    # The loaded backbone computes what timm's own model of that name computes with the same tensors.
    reference.load_state_dict(file, strict=True)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for ours, theirs in zip(model.backbone.eval()(x), reference.eval()(x), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_efficientnet_b0_checkpoint_loads_into_d0(checkpoints, fmt):
    reference = timm.create_model("efficientnet_b0", features_only=True, out_indices=(2, 3, 4), pretrained=False)
    _assert_loads(preset("d0", num_classes=3), checkpoints["efficientnet_b0"][fmt], reference)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_efficientnet_lite0_checkpoint_loads_into_lite_spec(checkpoints, fmt):
    reference = timm.create_model("efficientnet_lite0", features_only=True, out_indices=(2, 3, 4), pretrained=False)
    _assert_loads(LITE0, checkpoints["efficientnet_lite0"][fmt], reference)


def test_wrong_width_is_refused_naming_the_field_and_the_file(checkpoints):
    path = checkpoints["efficientnet_b0"]["safetensors"]
    spec = B0_SMALL.replace(backbone_width=0.5)
    with pytest.raises(SpecError, match="backbone_width") as caught:
        load_backbone_weights(build_on_meta(spec), spec, path)
    message = str(caught.value)
    assert message.startswith("backbone_width: model.backbone_weights ")
    assert str(path) in message
    assert "holds efficientnet_b0 (family efficientnet, width 1.0, depth 1.0)" in message
    assert "set backbone_width: 1.0, backbone_depth: 1.0" in message
    assert "(backbone_depth)" not in message  # the block names match; only the shapes differ


def test_wrong_depth_is_refused_naming_the_field(checkpoints):
    path = checkpoints["efficientnet_b0"]["pth"]
    spec = B0_SMALL.replace(backbone_depth=1.1)  # b1's depth: one more block in most stages
    with pytest.raises(SpecError, match="backbone_depth") as caught:
        load_backbone_weights(build_on_meta(spec), spec, path)
    message = str(caught.value)
    assert message.startswith("backbone_depth: ")
    # Stage 0 has one block at depth 1.0 and ceil(1.1) = 2 at depth 1.1.
    assert "tensors missing from the file, e.g. blocks.0.1." in message and "unexpected" not in message
    assert "(backbone_width)" not in message  # the blocks both have are the same shape
    assert str(path) in message and "holds efficientnet_b0" in message


def test_wrong_family_is_refused_naming_the_family(checkpoints):
    path = checkpoints["efficientnet_lite0"]["safetensors"]
    with pytest.raises(SpecError, match="^backbone_family: ") as caught:
        load_backbone_weights(build_on_meta(B0_SMALL), B0_SMALL, path)
    message = str(caught.value)
    assert "set backbone_family: efficientnet_lite, backbone_width: 1.0, backbone_depth: 1.0" in message
    assert "(backbone_width)" not in message and "(backbone_depth)" not in message  # a family tells no depth


def test_a_nonstandard_file_is_refused_without_guessing(tmp_path):
    odd = ModelSpec(num_classes=3, backbone_width=0.5, backbone_depth=0.5, image_size=128, max_level=5)
    path = tmp_path / "odd.safetensors"
    save_file(build_model(odd).backbone.state_dict(), path)
    assert standard_backbone_of(read_backbone_weights(path)) is None
    with pytest.raises(SpecError, match="^backbone_width: .*matches none of timm's standard sizes"):
        load_backbone_weights(build_on_meta(B0_SMALL), B0_SMALL, path)


def test_standard_backbone_of_identifies_the_saved_files(checkpoints):
    for fmt in ("pth", "safetensors"):
        b0 = read_backbone_weights(checkpoints["efficientnet_b0"][fmt])
        lite0 = read_backbone_weights(checkpoints["efficientnet_lite0"][fmt])
        assert standard_backbone_of(b0) == ("efficientnet_b0", "efficientnet", 1.0, 1.0)
        assert standard_backbone_of(lite0) == ("efficientnet_lite0", "efficientnet_lite", 1.0, 1.0)


@pytest.mark.parametrize("name", list(STANDARD_BACKBONES))
def test_each_standard_size_matches_timms_own_model_of_that_name(name):
    # Built by timm's public entry point (efficientnet_b5, ...), so the table is checked against timm, not itself.
    with torch.device("meta"):
        full = timm.create_model(name, pretrained=False).state_dict()
    assert standard_backbone_of(full) == (name, *STANDARD_BACKBONES[name])


def test_reading_drops_only_the_classifier(checkpoints):
    weights = read_backbone_weights(checkpoints["efficientnet_b0"]["pth"])
    assert not [k for k in weights if k.split(".")[0] in ("conv_head", "bn2", "classifier")]
    assert "blocks.0.0.bn2.weight" in weights  # a block's bn2 is the backbone's, not the classifier's
    assert weights["bn1.num_batches_tracked"].item() == 1234


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("case", ["missing", "garbage.pth", "garbage.safetensors", "no_tensors.pth",
                                  "only_classifier.pth", "pickled_code.pth"])
def test_unusable_files_are_config_errors_naming_the_key(tmp_path, case):
    path = tmp_path / case
    marker = tmp_path / "code_ran"
    if case.startswith("garbage"):
        path.write_bytes(b"these are not weights\n" * 10)
    elif case == "no_tensors.pth":
        torch.save({"epoch": 3, "arch": "efficientnet_b0"}, path)
    elif case == "only_classifier.pth":
        torch.save({"classifier.weight": torch.zeros(2, 4), "conv_head.weight": torch.zeros(4, 4, 1, 1)}, path)
    elif case == "pickled_code.pth":
        torch.save(_RunsCode(marker), path)
    with pytest.raises(ConfigError, match=f"^model.backbone_weights: {path}: ") as caught:
        read_backbone_weights(path)
    assert not isinstance(caught.value, SpecError)
    assert not marker.exists()  # weights_only: the pickle's code was refused, never run
    if case == "pickled_code.pth":
        assert "refused: it pickles objects other than tensors" in str(caught.value)
