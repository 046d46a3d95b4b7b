"""The ATSS assigner on a hand-built anchor set, with the positives worked out below, and inside the batch labeler."""
import statistics

import pytest
import torch
from effdet.anchors import Anchors

from trainers.anchors import BatchAnchorLabeler
from trainers.atss import atss_matches
from trainers.model import effdet_config
from trainers.spec import ModelSpec

# Two levels of one square anchor per location, on a 32x32 image:
#   level A, stride 8: 4x4 locations, centres (4 + 8i, 4 + 8j), anchors 16x16 -> anchor ids 0..15 (row-major);
#   level B, stride 16: 2x2 locations, centres (8 + 16i, 8 + 16j), anchors 32x32 -> anchor ids 16..19.
LEVELS = [(0, 16, 1), (16, 4, 1)]


def _anchors():
    boxes = []
    for stride, side, size in [(8, 4, 16), (16, 2, 32)]:
        for i in range(side):
            for j in range(side):
                cy, cx = stride / 2 + stride * i, stride / 2 + stride * j
                boxes.append([cy - size / 2, cx - size / 2, cy + size / 2, cx + size / 2])
    return torch.tensor(boxes)


def _iou(a, b):
    h = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    w = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = h * w
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _match(gt_boxes, topk):
    anchors = _anchors()
    boxes = torch.tensor([gt_boxes], dtype=torch.float32)
    iou = torch.tensor([[[_iou(g, a.tolist()) for a in anchors] for g in gt_boxes]])
    centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    valid = torch.ones(1, len(gt_boxes), dtype=torch.bool)
    return atss_matches(iou, boxes, valid, centers, LEVELS, topk)[0]


def test_the_one_anchor_above_mean_plus_std_is_the_positive():
    # Box (0, 0, 20, 20), centre (10, 10), k = 3 locations per level.
    # Level A's nearest centres: (12, 12) [anchor 5], then (4, 12) and (12, 4) [anchors 1, 4], tied.
    #   IoUs: 256 / 400 = 0.64; 192 / 464 = 0.4138 each.
    # Level B's nearest: (8, 8) [16], then (8, 24), (24, 8) [17, 18], tied.
    #   IoUs: 400 / 1024 = 0.3906; 240 / 1184 = 0.2027 each.
    ious = [0.64, 192 / 464, 192 / 464, 400 / 1024, 240 / 1184, 240 / 1184]
    threshold = statistics.mean(ious) + statistics.stdev(ious)
    assert threshold == pytest.approx(0.5402, abs=1e-4)  # only anchor 5 reaches it, and its centre is inside
    matches = _match([[0, 0, 20, 20]], topk=3)
    assert (matches >= 0).nonzero().flatten().tolist() == [5]
    assert matches[5] == 0


def test_a_candidate_above_the_threshold_whose_centre_lies_outside_the_box_is_not_positive():
    # Box (0, 3, 6, 11), centre (3, 7), area 48, k = 3.
    # Level A: anchor 0 at (4, 4): IoU 48 / 256 = 0.1875; anchor 1 at (4, 12): 42 / 262 = 0.1603;
    #   anchor 4 at (12, 4): 16 / 288 = 0.0556.
    # Level B: anchor 16 at (8, 8): 48 / 1024 = 0.0469; 17 at (8, 24): 18 / 1054 = 0.0171; 18 at (24, 8): 0.
    ious = [48 / 256, 42 / 262, 16 / 288, 48 / 1024, 18 / 1054, 0.0]
    threshold = statistics.mean(ious) + statistics.stdev(ious)
    assert threshold == pytest.approx(0.1554, abs=1e-4)
    # Anchors 0 and 1 both reach it, but anchor 1's centre (x = 12) is right of the box (x2 = 11).
    matches = _match([[0, 3, 6, 11]], topk=3)
    assert (matches >= 0).nonzero().flatten().tolist() == [0]


def test_an_anchor_positive_for_two_boxes_goes_to_the_one_it_overlaps_most():
    # Anchor 5 (4, 4, 20, 20) is positive for (0, 0, 20, 20) at IoU 0.64 (first test) and for (5, 5, 21, 21)
    # at IoU 225 / 287 = 0.784, whose other candidates overlap it far less: it goes to the second box.
    alone = _match([[5, 5, 21, 21]], topk=3)
    assert alone[5] == 0
    both = _match([[0, 0, 20, 20], [5, 5, 21, 21]], topk=3)
    assert both[5] == 1
    assert set((both >= 0).nonzero().flatten().tolist()) == set((alone >= 0).nonzero().flatten().tolist())


def test_padding_rows_match_nothing():
    anchors = _anchors()
    boxes = torch.tensor([[[0.0, 0, 20, 20], [-1e6, -1e6, -1e6, -1e6]]])
    iou = torch.tensor([[[_iou(g, a.tolist()) for a in anchors] for g in boxes[0].tolist()]])
    valid = torch.tensor([[True, False]])
    matches = atss_matches(iou, boxes, valid, (anchors[:, :2] + anchors[:, 2:]) / 2, LEVELS, 3)[0]
    assert (matches >= 0).nonzero().flatten().tolist() == [5] and matches[5] == 0


def test_the_labeler_with_atss_labels_each_box_from_candidates_at_every_level():
    """On effdet's anchors (9 per location): every box of the batch gets positives, all with their own class, at
    anchors whose centres lie inside it, and the box targets decode back to the box."""
    spec = ModelSpec(num_classes=3, image_size=128, max_level=5, anchor_scale=1.5, assigner="atss")
    anchors = Anchors.from_config(effdet_config(spec))
    labeler = BatchAnchorLabeler(anchors, 3, assigner="atss", atss_topk=9)
    boxes = torch.full((2, 4, 4), -1.0)
    classes = torch.full((2, 4), -1.0)
    boxes[0, :2] = torch.tensor([[10.0, 10, 50, 40], [60, 70, 120, 126]])
    classes[0, :2] = torch.tensor([1.0, 3.0])
    boxes[1, :1] = torch.tensor([[30.0, 30, 46, 52]])
    classes[1, :1] = torch.tensor([2.0])
    labels = labeler(boxes, classes)
    cls = torch.cat([labels[f"label_cls_{lv}"].reshape(2, -1) for lv in range(spec.num_levels)], 1)
    codes = torch.cat([labels[f"label_bbox_{lv}"].reshape(2, -1, 4) for lv in range(spec.num_levels)], 1)
    from effdet.anchors import decode_box_outputs

    centers = (anchors.boxes[:, :2] + anchors.boxes[:, 2:]) / 2
    for image, count in [(0, 2), (1, 1)]:
        for g in range(count):
            box, label = boxes[image, g], int(classes[image, g]) - 1
            decoded = decode_box_outputs(codes[image], anchors.boxes.float())  # y1, x1, y2, x2
            mine = (cls[image] == label) & torch.isclose(decoded, box, atol=1e-3).all(1)
            assert mine.sum() >= 1, (image, g)
            inside = (centers[mine] > box[:2]).all(1) & (centers[mine] < box[2:]).all(1)
            assert inside.all()
        assert int(labels["label_num_positives"][image]) == int((cls[image] >= 0).sum())
    assert not (cls == -2).any()  # ATSS ignores nothing
