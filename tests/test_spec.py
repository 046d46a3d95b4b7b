"""ModelSpec validation: bad values and unknown keys are errors that name the field."""
import pytest

from trainers.spec import ModelSpec, SpecError
from trainers.typed import ConfigError

GOOD = {"num_classes": 3, "image_size": 256, "max_level": 5}


def test_round_trip():
    spec = ModelSpec.from_dict(GOOD)
    assert spec.num_levels == 3
    assert ModelSpec.from_dict(spec.to_dict()) == spec


def test_ints_are_accepted_for_floats():
    assert ModelSpec.from_dict({**GOOD, "backbone_width": 1}).backbone_width == 1.0


@pytest.mark.parametrize("field, value, fragment", [
    ("num_classes", 0, "num_classes: must be >= 1"),
    ("backbone_family", "resnet", "backbone_family: must be one of"),
    ("backbone_width", 0.0, "backbone_width: must be in"),
    ("backbone_depth", -1, "backbone_depth: must be in"),
    ("image_size", 100, "image_size: must be a positive multiple of 2**max_level = 32"),
    ("min_level", 2, "min_level: must be 3"),
    ("max_level", 9, "max_level: must be in [3, 8]"),
    ("anchor_scale", 0, "anchor_scale: must be > 0"),
    ("fpn_channels", 60, "fpn_channels: must be a multiple of 8"),
    ("fpn_repeats", 0, "fpn_repeats: must be in"),
    ("head_repeats", 0, "head_repeats: must be in"),
    ("fusion", "concat", "fusion: must be one of"),
    ("focal_alpha", 1.5, "focal_alpha: must be in (0, 1)"),
    ("bn_momentum", 0, "bn_momentum: must be in (0, 1]"),
    ("neck", "nasfpn", "neck: must be one of ('bifpn', 'pan', 'fpn')"),
    ("head", "fcos", "head: must be one of ('anchor', 'center')"),
    ("center_level", 6, "center_level: must be a neck level in [3, 5]"),
    ("assigner", "simota", "assigner: must be one of ('iou', 'atss')"),
    ("match_threshold", 0, "match_threshold: must be in (0, 1]"),
    ("unmatched_threshold", 0.7, "unmatched_threshold: must be in (0, match_threshold = 0.5]"),
    ("atss_topk", 0, "atss_topk: must be in [1, 64]"),
    ("box_loss", "l1", "box_loss: must be one of ('huber', 'giou', 'diou', 'ciou')"),
    ("iou_loss_weight", -1, "iou_loss_weight: must be > 0"),
    ("label_smoothing", 0.5, "label_smoothing: must be in [0, 0.5)"),
])
def test_bad_values_name_the_field(field, value, fragment):
    with pytest.raises(SpecError) as err:
        ModelSpec.from_dict({**GOOD, field: value}, where="my.yaml")
    assert str(err.value).startswith("my.yaml.")
    assert fragment in str(err.value)


@pytest.mark.parametrize("data, fragment", [
    ({**GOOD, "fpn_chanels": 64}, "spec.fpn_chanels: unknown key"),
    ({"image_size": 256}, "spec.num_classes: missing required key"),
    ({**GOOD, "image_size": "256"}, "spec.image_size: must be an integer, got '256'"),
    ({**GOOD, "backbone_width": True}, "spec.backbone_width: must be a number"),
    ({**GOOD, "fusion": 3}, "spec.fusion: must be a string"),
    ({**GOOD, "neck": None}, "spec.neck: must be a string"),
    ({**GOOD, "atss_topk": 4.5}, "spec.atss_topk: must be an integer"),
    ([1, 2], "spec: expected a mapping"),
])
def test_wrong_shapes_name_the_key(data, fragment):
    with pytest.raises(ConfigError) as err:
        ModelSpec.from_dict(data)
    assert fragment in str(err.value)
