"""trainers/centernet.py: CenterNet targets, loss, decoding and model on effdet's backbone and BiFPN."""
import contextlib
import io
import math
import time

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from trainers.annotations import LabelMap
from trainers.centernet import (CenterLabeler, CenterNet, CenterPredictBench, CenterTrainBench, center_loss,
                                decode, gaussian_radius)
from trainers.data import effdet_detections_to_coco
from trainers.model import effdet_config
from trainers.spec import ModelSpec

SMALL = dict(num_classes=3, backbone_family="efficientnet_lite", backbone_width=0.5, backbone_depth=0.5,
             image_size=128, max_level=5, fpn_channels=32, fpn_repeats=1, head_repeats=2, anchor_scale=1.5)
LEVEL, STRIDE = 3, 8


@pytest.fixture(scope="module")
def config():
    return effdet_config(ModelSpec(**SMALL))


@pytest.fixture
def one_thread():
    """On 2 shared cores, two intra-op threads competing with other processes made a training step of this tiny
    model 20x slower (2 s instead of 0.1 s, measured); one thread is steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perfect_outputs(targets, eps=1e-4):
    """What a perfect model would output: the target heatmap's logits and the regression targets at the peaks."""
    heatmap = targets["center_heatmap"]
    logits = torch.logit(heatmap.clamp(eps, 1 - eps))
    batch, _, height, width = heatmap.shape
    regression = torch.zeros(batch, 4, height * width)
    image, box = targets["center_valid"].nonzero(as_tuple=True)
    regression[image, :, targets["center_index"][image, box]] = targets["center_regression"][image, box]
    return logits, regression.view(batch, 4, height, width)


# --- targets -------------------------------------------------------------------------------------------

def test_targets_for_a_hand_placed_box(config):
    labeler = CenterLabeler(config, LEVEL)
    # y1, x1, y2, x2 in input pixels: 64 x 96 px = 8 x 12 cells, centre (y, x) = (52, 60) px = (6.5, 7.5) cells.
    boxes = torch.tensor([[[20.0, 12.0, 84.0, 108.0], [5.0, 5.0, 50.0, 50.0], [-3.0, 7.0, 1e9, 2.0]]])
    classes = torch.tensor([[2, -1, -1]])
    weights = torch.tensor([[0.25, 1.0, 1.0]])
    targets = labeler(boxes, classes, weights)

    # CornerNet's radius for an 8 x 12 cell box at IoU 0.7, by hand: the third case is the smallest.
    h, w, iou = 8.0, 12.0, 0.7
    r1 = (h + w + math.sqrt((h + w) ** 2 - 4 * w * h * (1 - iou) / (1 + iou))) / 2  # 19.1
    r2 = (2 * (h + w) + math.sqrt(4 * (h + w) ** 2 - 16 * (1 - iou) * w * h)) / 2  # 36.9
    r3 = (-2 * iou * (h + w) + math.sqrt(4 * iou**2 * (h + w) ** 2 + 16 * iou * (1 - iou) * w * h)) / 2
    assert r3 == pytest.approx(2.6325, abs=1e-4) and r3 < min(r1, r2)
    assert gaussian_radius(torch.tensor(h), torch.tensor(w)).item() == pytest.approx(r3, rel=1e-6)
    radius, sigma = 2, 5 / 6  # int(r3); sigma = diameter / 6

    heatmap = targets["center_heatmap"]
    assert heatmap.shape == (1, 3, 16, 16) and heatmap.dtype == torch.float32
    assert heatmap[0, 0].sum() == 0 and heatmap[0, 2].sum() == 0  # only class 2 (channel 1) has a box
    peak_y, peak_x = 6, 7
    assert heatmap[0, 1, peak_y, peak_x] == 1.0
    assert heatmap[0, 1].flatten().argmax() == peak_y * 16 + peak_x
    assert heatmap[0, 1, peak_y + 1, peak_x].item() == pytest.approx(math.exp(-1 / (2 * sigma**2)), rel=1e-6)
    assert heatmap[0, 1, peak_y - 2, peak_x + 2].item() == pytest.approx(math.exp(-8 / (2 * sigma**2)), rel=1e-5)
    assert heatmap[0, 1, peak_y, peak_x + radius + 1] == 0  # cut at the radius, as CenterNet draws it
    assert (heatmap[0, 1] > 0).sum() == (2 * radius + 1) ** 2

    assert targets["center_index"][0, 0] == peak_y * 16 + peak_x
    assert targets["center_class"].tolist() == [[1, -1, -1]]
    torch.testing.assert_close(targets["center_regression"][0, 0],
                               torch.tensor([math.log(8.0), math.log(12.0), 0.5, 0.5]))
    # Padding rows (class -1, whatever their boxes) carry nothing; the weight is carried for the real box.
    assert targets["center_valid"].tolist() == [[True, False, False]]
    assert targets["center_weight"].tolist() == [[0.25, 0.0, 0.0]]
    assert targets["center_regression"][0, 1:].abs().sum() == 0
    assert torch.isfinite(targets["center_regression"]).all()


def test_overlapping_boxes_of_one_class_take_the_max_and_images_are_labelled_independently(config):
    labeler = CenterLabeler(config, LEVEL)
    near = torch.tensor([[40.0, 40.0, 88.0, 88.0], [40.0, 56.0, 88.0, 104.0]])  # peaks two cells apart
    alone = [labeler(near[i:i + 1][None], torch.tensor([[1]]))["center_heatmap"][0, 0] for i in range(2)]
    both = labeler(near[None], torch.tensor([[1, 1]]))["center_heatmap"][0, 0]
    torch.testing.assert_close(both, torch.maximum(*alone))

    batch = torch.stack([near, near.flip(0) + 8])
    classes = torch.tensor([[1, 3], [2, -1]])
    together = labeler(batch, classes)
    for i in range(2):
        single = labeler(batch[i:i + 1], classes[i:i + 1])
        for key, value in single.items():
            torch.testing.assert_close(together[key][i:i + 1], value)


def test_a_peak_outside_the_map_is_clamped_to_its_edge(config):
    targets = CenterLabeler(config, LEVEL)(torch.tensor([[[100.0, 120.0, 140.0, 160.0]]]), torch.tensor([[1]]))
    assert targets["center_index"].item() == 15 * 16 + 15
    torch.testing.assert_close(targets["center_regression"][0, 0, 2:], torch.tensor([0.0, 2.5]))


# --- decoding ------------------------------------------------------------------------------------------

def synthetic_scenes(num_images=6, seed=0):
    """Boxes of 3 classes, 10-90 px, within a 128 x 100 px (w x h) original image, no two sharing a peak cell."""
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(num_images):
        boxes, classes, cells = [], [], set()
        while len(boxes) < 4:
            height, width = rng.uniform(10, 90, size=2)
            y1, x1 = rng.uniform(0, 100 - height), rng.uniform(0, 128 - width)
            cell = (int((y1 + height / 2) // STRIDE), int((x1 + width / 2) // STRIDE))
            if cell not in cells:
                cells.add(cell)
                boxes.append([y1, x1, y1 + height, x1 + width])
                classes.append(int(rng.integers(1, 4)))
        scenes.append((np.array(boxes, dtype=np.float32), np.array(classes)))
    return scenes


def test_perfect_outputs_decode_to_the_boxes_and_score_ap_1_with_cocoeval(config):
    scenes = synthetic_scenes()
    boxes = torch.tensor(np.stack([b for b, _ in scenes]))
    classes = torch.tensor(np.stack([c for _, c in scenes]))
    img_scale = torch.tensor([1.0, 2.0, 0.5, 1.5, 3.0, 1.25])  # original pixels per input pixel
    img_size = torch.stack([128 * img_scale, 100 * img_scale], 1)  # original (w, h)
    logits, regression = perfect_outputs(CenterLabeler(config, LEVEL)(boxes, classes))

    detections = decode(logits, regression, stride=STRIDE, img_scale=img_scale, img_size=img_size, max_det=20)
    assert detections.shape == (6, 20, 6)
    for i, (image_boxes, image_classes) in enumerate(scenes):
        found = detections[i][detections[i, :, 4] > 0.5]  # the true peaks score 1 - 1e-4, the rest 1e-4
        expected = torch.tensor(image_boxes[:, [1, 0, 3, 2]]) * img_scale[i]
        order_found = sorted(range(len(found)), key=lambda j: found[j, :2].tolist())
        order_expected = sorted(range(len(expected)), key=lambda j: expected[j, :2].tolist())
        torch.testing.assert_close(found[order_found, :4], expected[order_expected], atol=1e-3 * img_scale[i].item(),
                                   rtol=0)
        assert found[order_found, 5].tolist() == image_classes[order_expected].tolist()

    categories = (1, 5, 9)  # gapped COCO ids, through the project's own conversion
    gt = {"images": [], "annotations": [], "categories": [{"id": c, "name": str(c)} for c in categories]}
    for i, (image_boxes, image_classes) in enumerate(scenes):
        scale = img_scale[i].item()
        gt["images"].append({"id": 10 + i, "width": 128 * scale, "height": 100 * scale})
        for (y1, x1, y2, x2), label in zip(image_boxes * scale, image_classes):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": 10 + i,
                                      "category_id": categories[label - 1], "iscrowd": 0,
                                      "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
    results = effdet_detections_to_coco(detections.numpy(), np.arange(10, 16), LabelMap(categories))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        cocoeval = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="bbox")
        cocoeval.evaluate()
        cocoeval.accumulate()
        cocoeval.summarize()
    assert cocoeval.stats[0] >= 0.99, cocoeval.stats


def test_decode_clips_to_the_image_pads_and_matches_effdet_conventions(config):
    boxes = torch.tensor([[[60.0, 100.0, 100.0, 140.0]], [[8.0, 8.0, 24.0, 40.0]]])  # image 0's box sticks out
    logits, regression = perfect_outputs(CenterLabeler(config, LEVEL)(boxes, torch.tensor([[3], [1]])), eps=0)
    info = {"img_scale": torch.tensor([2.0, 1.0]), "img_size": torch.tensor([[240.0, 160.0], [128.0, 128.0]])}
    detections = decode(logits, regression, stride=STRIDE, max_det=5, **info)
    assert detections.shape == (2, 5, 6) and detections.dtype == torch.float32
    # Clipped to (w, h) = (240, 160) / 2 in input pixels, then scaled by 2, as effdet's generate_detections does.
    torch.testing.assert_close(detections[0, 0], torch.tensor([200.0, 120.0, 240.0, 160.0, 1.0, 3.0]))
    torch.testing.assert_close(detections[1, 0], torch.tensor([8.0, 8.0, 40.0, 24.0, 1.0, 1.0]))
    assert (detections[:, 1:] == 0).all()  # with eps=0 nothing else scores: all-zero padding rows
    unscaled = decode(logits, regression, stride=STRIDE, max_det=5)
    torch.testing.assert_close(unscaled[0, 0, :4], torch.tensor([100.0, 60.0, 140.0, 100.0]))


def test_two_neighbours_that_tie_are_one_peak():
    """Half-precision logits round to few values, so neighbouring cells can tie. A cell equal to its window's
    max was a peak, and such a pair gave two boxes for one object; only the first of the pair is one now. A
    cell two apart from an equal one is a peak of its own."""
    logits = torch.full((1, 1, 8, 8), -10.0)
    logits[0, 0, 3, 3] = logits[0, 0, 3, 4] = 2.0  # a tied pair: one object
    logits[0, 0, 6, 1] = logits[0, 0, 6, 3] = 1.0  # two cells apart: two objects
    regression = torch.zeros(1, 4, 8, 8)
    detections = decode(logits.half(), regression, stride=STRIDE, max_det=10)
    kept = detections[0, detections[0, :, 4] > 0.5]
    centres = {(int((row[1] + row[3]) / 2 / STRIDE), int((row[0] + row[2]) / 2 / STRIDE)) for row in kept}
    assert centres == {(3, 3), (6, 1), (6, 3)}


# --- loss ----------------------------------------------------------------------------------------------

def test_loss_is_small_for_perfect_outputs_larger_for_wrong_ones_and_weights_scale_box_terms(config):
    labeler = CenterLabeler(config, LEVEL)
    scenes = synthetic_scenes(num_images=2, seed=1)
    boxes = torch.tensor(np.stack([b for b, _ in scenes]))
    classes = torch.tensor(np.stack([c for _, c in scenes]))
    targets = labeler(boxes, classes)
    logits, regression = perfect_outputs(targets)

    total, heatmap_loss, box_loss = center_loss(logits, regression, targets)
    assert box_loss.item() < 1e-6 and 0 <= heatmap_loss.item() < 0.05 and torch.isfinite(total)
    wrong = center_loss(torch.full_like(logits, -2.19), torch.zeros_like(regression), targets)
    assert wrong[1] > 20 * heatmap_loss and wrong[2] > 0.1 and wrong[0] > 10 * total

    # Against zero regression, each box's error is its own targets: its terms, scaled by its weight.
    weights = torch.tensor([[1.0, 2.0, 0.0, 1.0], [0.5, 1.0, 1.0, 3.0]])
    weighted = labeler(boxes, classes, weights)
    _, _, box_loss = center_loss(logits, torch.zeros_like(regression), weighted, size_weight=0.1, offset_weight=1.0)
    error = weighted["center_regression"].abs()
    per_box = 0.1 * error[..., :2].mean(-1) + 1.0 * error[..., 2:].mean(-1)
    assert box_loss.item() == pytest.approx(((per_box * weights).sum() / 8).item(), rel=1e-6)
    unweighted = center_loss(logits, torch.zeros_like(regression), targets)[2]
    assert unweighted.item() == pytest.approx((per_box.sum() / 8).item(), rel=1e-6)

    # A box's positive heatmap term carries its weight too: at weight 0 a missed peak costs nothing.
    missed = logits.clone()
    image, label, cell = 0, classes[0, 2] - 1, targets["center_index"][0, 2]
    missed.view(2, 3, -1)[image, label, cell] = -5.0
    assert center_loss(missed, regression, weighted)[1].item() == pytest.approx(
        center_loss(logits, regression, weighted)[1].item(), abs=1e-6)
    assert center_loss(missed, regression, targets)[1] > center_loss(logits, regression, targets)[1] + 0.5


def test_an_image_with_no_boxes_gives_a_finite_loss(config):
    targets = CenterLabeler(config, LEVEL)(torch.zeros(2, 3, 4), torch.full((2, 3), -1))
    total, heatmap_loss, box_loss = center_loss(torch.zeros(2, 3, 16, 16), torch.zeros(2, 4, 16, 16), targets)
    assert torch.isfinite(total) and box_loss == 0 and heatmap_loss > 0


# --- model ---------------------------------------------------------------------------------------------

def test_model_shapes_devices_export_and_no_anchor_heads(config, one_thread):
    torch.manual_seed(0)
    model = CenterNet(config, LEVEL)
    assert not hasattr(model, "class_net") and not hasattr(model, "box_net")
    assert model.level == LEVEL and model.stride == STRIDE and model.config.num_classes == 3
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cpu"}
    with torch.device("meta"):
        on_meta = CenterNet(config, 4)
    assert {t.device.type for t in [*on_meta.parameters(), *on_meta.buffers()]} == {"meta"}
    assert on_meta.stride == 16
    with pytest.raises(ValueError, match="level"):
        CenterNet(config, 6)

    x = torch.randn(2, 3, 128, 128)
    heatmap, regression = model(x)
    assert heatmap.shape == (2, 3, 16, 16) and regression.shape == (2, 4, 16, 16)
    assert heatmap.mean().item() == pytest.approx(-2.19, abs=0.3)  # CenterNet's prior of 0.1

    # Gradients reach the backbone and both towers through the loss.
    targets = CenterLabeler(config, LEVEL)(torch.tensor([[[16.0, 16.0, 80.0, 64.0]]] * 2), torch.tensor([[1], [2]]))
    CenterTrainBench(model)(x, targets)["loss"].backward()
    for part in (model.backbone, model.fpn, model.heatmap_net, model.regression_net):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())

    model.eval()
    exported = torch.export.export(model, (torch.zeros(2, 3, 128, 128),))
    with torch.no_grad():
        for ours, theirs in zip(exported.module()(x), model(x)):
            torch.testing.assert_close(ours, theirs)
        detections = CenterPredictBench(model, max_det=7)(x, {"img_scale": torch.ones(2),
                                                             "img_size": torch.full((2, 2), 128.0)})
    assert detections.shape == (2, 7, 6)


def test_a_tiny_model_overfits_one_batch_and_finds_the_squares(one_thread):
    torch.manual_seed(0)
    # BatchNorm's running statistics must catch up within 80 steps for the eval-mode check below; at the
    # spec's default momentum (0.01) they had not, and eval-mode decoding missed the squares.
    config = effdet_config(ModelSpec(**{**SMALL, "bn_momentum": 0.1}))
    model = CenterNet(config, LEVEL)
    boxes = torch.tensor([[[24.0, 32.0, 72.0, 80.0]], [[56.0, 40.0, 112.0, 120.0]]])  # y1, x1, y2, x2
    classes = torch.tensor([[1], [2]])
    images = torch.full((2, 3, 128, 128), -1.0)
    for image, (y1, x1, y2, x2) in zip(images, boxes[:, 0].long().tolist()):
        image[:, y1:y2, x1:x2] = 1.0
    targets = CenterLabeler(config, LEVEL)(boxes, classes)
    bench = CenterTrainBench(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)

    start, losses = time.perf_counter(), []
    for _ in range(80):
        loss = bench(images, targets)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    # Measured over seeds 0-7: the loss fell 95-260x and every square was found with IoU 0.62-0.94 (eval mode).
    assert losses[-1] < losses[0] / 20, (losses[0], losses[-1], seconds)

    model.eval()
    with torch.no_grad():
        detections = CenterPredictBench(model, max_det=5)(images)
    for i in range(2):
        best = detections[i, 0]
        assert best[5] == classes[i, 0]
        iou = _iou(best[:4], boxes[i, 0, [1, 0, 3, 2]])
        assert iou >= 0.5, (i, best, iou, losses[0], losses[-1], seconds)


def _iou(a, b):
    width = (torch.minimum(a[2], b[2]) - torch.maximum(a[0], b[0])).clamp(min=0)
    height = (torch.minimum(a[3], b[3]) - torch.maximum(a[1], b[1])).clamp(min=0)
    inter = width * height
    return (inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)).item()
