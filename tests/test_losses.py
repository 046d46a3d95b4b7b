"""The anchor head's loss: effdet's loss where it is effdet's, IoU losses with hand-computed values, box weights."""
import math

import pytest
import torch
from effdet.anchors import AnchorLabeler, Anchors
from effdet.loss import loss_fn
from effdet.object_detection import ArgMaxMatcher

from tests.test_anchors import _random_batch
from trainers.anchors import BatchAnchorLabeler
from trainers.losses import AnchorLoss, box_iou_loss
from trainers.model import effdet_config
from trainers.spec import ModelSpec

SPEC = ModelSpec(num_classes=3, image_size=128, max_level=5, anchor_scale=1.5)


def _outputs(spec, generator, scale=0.5):
    """Random per-level class and box outputs shaped as effdet's heads give them."""
    anchors = Anchors.from_config(effdet_config(spec))
    per_location = anchors.get_anchors_per_location()
    cls, box = [], []
    for level in range(spec.min_level, spec.max_level + 1):
        height, width = anchors.feat_sizes[level]
        cls.append(torch.randn(2, per_location * spec.num_classes, height, width, generator=generator) * 2)
        box.append(torch.randn(2, per_location * 4, height, width, generator=generator) * scale)
    return anchors, cls, box


def _labels(spec, anchors, weights=None, seed=0):
    boxes, classes = _random_batch(torch.Generator().manual_seed(seed), 2, spec.image_size)
    classes[:, 0] = 1.0  # at least one box per image
    boxes[:, 0] = torch.tensor([10.0, 12.0, 60.0, 50.0])
    labeler = BatchAnchorLabeler(anchors, spec.num_classes, match_threshold=spec.match_threshold,
                                 unmatched_threshold=spec.unmatched_threshold)
    return labeler(boxes, classes, weights), boxes, classes


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_the_huber_loss_is_effdets_detection_loss(label_smoothing):
    spec = SPEC.replace(label_smoothing=label_smoothing)
    anchors, cls, box = _outputs(spec, torch.Generator().manual_seed(1))
    targets, _, _ = _labels(spec, anchors)
    ours = AnchorLoss(spec, anchors)(cls, box, targets)
    levels = range(spec.num_levels)
    config = effdet_config(spec)
    theirs = loss_fn(cls, box, [targets[f"label_cls_{lv}"] for lv in levels],
                     [targets[f"label_bbox_{lv}"] for lv in levels], targets["label_num_positives"],
                     num_classes=3, alpha=spec.focal_alpha, gamma=spec.focal_gamma, delta=config.delta,
                     box_loss_weight=spec.box_loss_weight, label_smoothing=label_smoothing)
    for mine, effdets in zip(ours, theirs):
        torch.testing.assert_close(mine, effdets, rtol=1e-5, atol=1e-6)
    assert ours[1] > 0 and ours[2] > 0


def test_label_smoothing_moves_the_class_targets_toward_one_half():
    # One logit of 0 (p = 0.5) against a positive target: focal loss with gamma 0 and alpha 0.5 is
    # 0.5 * BCE(0, t); smoothing 0.2 makes the target 0.9, and BCE(0, t) = log 2 for any t.
    # A confident right logit shows the change instead: BCE(4, 1) vs BCE(4, 0.9).
    spec = SPEC.replace(num_classes=1, focal_gamma=0.0, focal_alpha=0.5, max_level=3, image_size=8,
                        anchor_scale=1.0)
    anchors = Anchors.from_config(effdet_config(spec))
    per_location = anchors.get_anchors_per_location()
    logits = torch.full((1, per_location, 1, 1), 4.0)
    targets = {"label_cls_0": torch.zeros(1, 1, 1, per_location, dtype=torch.long),
               "label_bbox_0": torch.zeros(1, 1, 1, 4 * per_location), "label_num_positives": torch.zeros(1)}
    box = [torch.zeros(1, 4 * per_location, 1, 1)]
    plain = AnchorLoss(spec, anchors)([logits], box, targets)[1]
    smoothed = AnchorLoss(spec.replace(label_smoothing=0.2), anchors)([logits], box, targets)[1]
    p = 1 / (1 + math.exp(-4.0))
    bce = lambda t: -(t * math.log(p) + (1 - t) * math.log(1 - p))  # noqa: E731
    modulator = 1.0  # gamma 0
    assert plain.item() == pytest.approx(per_location * 0.5 * modulator * bce(1.0), rel=1e-5)
    assert smoothed.item() == pytest.approx(per_location * 0.5 * modulator * bce(0.9), rel=1e-5)


# (box, target, GIoU loss, DIoU loss, CIoU loss), x1,y1,x2,y2, worked out by hand.
_V = 4 / math.pi ** 2 * (math.atan(2.0) - math.atan(1.0)) ** 2  # CIoU's aspect term: 4x2 box vs 2x2 box
PAIRS = [
    # Overlapping squares: IoU 1/7, enclosing box 3x3 (area 9, diagonal^2 18), centres 2 apart squared.
    ((0, 0, 2, 2), (1, 1, 3, 3), 1 - 1 / 7 + 2 / 9, 1 - 1 / 7 + 2 / 18, 1 - 1 / 7 + 2 / 18),
    # Disjoint: IoU 0, enclosing 3x1 (area 3, union 2, diagonal^2 10), centres 2 apart (squared 4).
    ((0, 0, 1, 1), (2, 0, 3, 1), 1 + 1 / 3, 1 + 4 / 10, 1 + 4 / 10),
    # Nested, same centre: IoU 0.25, the outer box encloses both, no centre distance.
    ((0, 0, 4, 4), (1, 1, 3, 3), 0.75, 0.75, 0.75),
    # Nested, same centre, other aspect ratios: IoU 0.5, and CIoU adds alpha * v, alpha = v / (1 - IoU + v).
    ((0, 0, 4, 2), (1, 0, 3, 2), 0.5, 0.5, 0.5 + _V / (0.5 + _V) * _V),
    # Identical: 0 for all three.
    ((1, 2, 5, 7), (1, 2, 5, 7), 0.0, 0.0, 0.0),
]


@pytest.mark.parametrize("kind, column", [("giou", 2), ("diou", 3), ("ciou", 4)])
def test_each_iou_loss_matches_hand_computed_values(kind, column):
    boxes = torch.tensor([p[0] for p in PAIRS], dtype=torch.float64)
    targets = torch.tensor([p[1] for p in PAIRS], dtype=torch.float64)
    expected = torch.tensor([p[column] for p in PAIRS], dtype=torch.float64)
    torch.testing.assert_close(box_iou_loss(kind, boxes, targets), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["giou", "diou", "ciou"])
def test_an_iou_loss_scores_the_decoded_boxes_of_the_positive_anchors(kind):
    """Perfect box outputs (the targets themselves) cost 0; shifted ones cost what the decoded boxes' loss says."""
    spec = SPEC.replace(box_loss=kind)
    anchors, cls, _ = _outputs(spec, torch.Generator().manual_seed(2))
    targets, _, _ = _labels(spec, anchors)
    perfect = [targets[f"label_bbox_{lv}"].permute(0, 3, 1, 2) for lv in range(spec.num_levels)]
    loss = AnchorLoss(spec, anchors)
    assert loss(cls, perfect, targets)[2].item() == pytest.approx(0.0, abs=1e-4)

    # Shift every output by ty = 0.5 (half an anchor height): each positive's decoded box moves by half its
    # anchor's height, and its loss is the IoU loss of that pair, which the decoded targets give directly.
    shifted = [p + torch.tensor([0.5, 0, 0, 0]).repeat(p.shape[1] // 4).view(1, -1, 1, 1) for p in perfect]
    from effdet.anchors import decode_box_outputs

    codes = torch.cat([targets[f"label_bbox_{lv}"].reshape(2, -1, 4) for lv in range(spec.num_levels)], 1)
    positive = torch.cat([targets[f"label_cls_{lv}"].reshape(2, -1) for lv in range(spec.num_levels)], 1) >= 0
    image, anchor = positive.nonzero(as_tuple=True)
    truth = decode_box_outputs(codes[image, anchor], anchors.boxes[anchor].float(), output_xyxy=True)
    moved = truth.clone()
    heights = anchors.boxes[anchor, 2] - anchors.boxes[anchor, 0]
    moved[:, [1, 3]] += 0.5 * heights[:, None].float()
    expected = box_iou_loss(kind, moved, truth).sum() / (positive.sum() + 1)
    total, _, box_loss = loss(cls, shifted, targets)
    torch.testing.assert_close(box_loss, expected.float(), rtol=1e-4, atol=1e-5)
    assert box_loss > 0.05
    assert total == pytest.approx(loss(cls, shifted, targets)[1] + spec.iou_loss_weight * box_loss)


@pytest.mark.parametrize("box_loss", ["huber", "giou"])
def test_box_weights_scale_each_positive_anchors_terms(box_loss):
    """Every box weighted 0.3: the box loss is 0.3 of the unweighted one; the background's class terms stay."""
    spec = SPEC.replace(box_loss=box_loss)
    anchors, cls, box = _outputs(spec, torch.Generator().manual_seed(3), scale=0.2)
    plain, boxes, classes = _labels(spec, anchors)
    weighted, _, _ = _labels(spec, anchors, weights=torch.full(classes.shape, 0.3))
    positive = torch.cat([weighted[f"label_cls_{lv}"].reshape(2, -1) for lv in range(spec.num_levels)], 1) >= 0
    assert torch.equal(weighted["label_weights"][positive], torch.full((int(positive.sum()),), 0.3))
    assert torch.equal(weighted["label_weights"][~positive], torch.ones(int((~positive).sum())))
    loss = AnchorLoss(spec, anchors)
    _, plain_cls, plain_box = loss(cls, box, plain)
    _, weighted_cls, weighted_box = loss(cls, box, weighted)
    torch.testing.assert_close(weighted_box, 0.3 * plain_box)
    assert plain_cls * 0.3 < weighted_cls < plain_cls  # background terms are not scaled


@pytest.mark.parametrize("box_loss", ["huber", "giou", "diou", "ciou"])
def test_the_loss_makes_no_op_that_waits_for_a_gpu_outside_torchvisions_iou_loss(box_loss):
    """On CUDA, nonzero(), boolean indexing (nonzero inside) and .item() make the host wait for the device.
    The loss's forward runs under a dispatch mode that sees every aten op and the Python frames that made it:
    none of those ops comes from our code (it gathered the positives of each level with nonzero(), one wait
    per level). torchvision's IoU losses assign through a boolean mask themselves (_loss_inter_union), so an
    IoU loss still waits there, once per step, as all levels go to it in one call. Untrained outputs (large
    size offsets) leave the loss and its gradient finite."""
    import sys

    from torch.utils._python_dispatch import TorchDispatchMode

    waits = {"nonzero", "masked_select", "_local_scalar_dense", "index", "index_put"}

    class RecordWaits(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ours, self.torchvisions, self.seen = [], [], 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen += 1
            if func.overloadpacket.__name__ in waits:
                frame, files = sys._getframe(), []
                while frame is not None:
                    files.append(frame.f_code.co_filename)
                    frame = frame.f_back
                inside = any("torchvision" in f for f in files)
                (self.torchvisions if inside else self.ours).append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    spec = SPEC.replace(box_loss=box_loss)
    anchors, cls, box = _outputs(spec, torch.Generator().manual_seed(4), scale=20.0)
    _, _, classes = _labels(spec, anchors)
    targets, _, _ = _labels(spec, anchors, weights=torch.full(classes.shape, 0.5))  # mixup's weights too
    outputs = [t.clone().requires_grad_() for t in box]
    with RecordWaits() as recorded:
        total, _, _ = AnchorLoss(spec, anchors)(cls, outputs, targets)
    total.backward()
    assert recorded.seen > 50  # the mode saw the loss's ops
    assert recorded.ours == []
    assert bool(recorded.torchvisions) == (box_loss != "huber")  # the frame test tells torchvision's apart
    assert torch.isfinite(total) and all(torch.isfinite(o.grad).all() for o in outputs)


def test_anchors_between_the_two_thresholds_are_ignored_as_by_effdets_matcher():
    spec = SPEC.replace(match_threshold=0.5, unmatched_threshold=0.4)
    anchors = Anchors.from_config(effdet_config(spec))
    targets, boxes, classes = _labels(spec, anchors, seed=5)
    cls = torch.cat([targets[f"label_cls_{lv}"].reshape(2, -1) for lv in range(spec.num_levels)], 1)
    effdets = AnchorLabeler(anchors, spec.num_classes, match_threshold=0.5)
    effdets.target_assigner._matcher = ArgMaxMatcher(0.5, unmatched_threshold=0.4,
                                                     negatives_lower_than_unmatched=True,
                                                     force_match_for_each_row=True)
    for image in range(2):
        valid = classes[image] > -1
        from effdet.object_detection.box_list import BoxList

        match = effdets.target_assigner._matcher.match(
            effdets.target_assigner._similarity_calc.compare(BoxList(boxes[image][valid]), BoxList(anchors.boxes)))
        ignored = match.match_results == -2  # effdet's matcher marks the band; its labeler then drops the mark
        assert ignored.any()
        assert torch.equal(cls[image] == -2, ignored)
        assert torch.equal(cls[image] >= 0, match.match_results >= 0)
    # With the two thresholds equal (the default) nothing is ignored: effdet's labels, as tests/test_anchors.py checks.
    default, _, _ = _labels(SPEC, anchors, seed=5)
    assert all((default[f"label_cls_{lv}"] != -2).all() for lv in range(SPEC.num_levels))
