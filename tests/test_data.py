"""The one COCO <-> effdet box conversion, the dataset's targets, and a labeler round trip scoring AP 1.0."""
import json

import numpy as np
import pytest
import torch
from effdet.anchors import AnchorLabeler, Anchors
from effdet.bench import _batch_detection, _post_process

from trainers.annotations import LabelMap
from trainers.data import (FILL_COLOR, CocoDetection, Collate, EpochSampler, coco_to_effdet_boxes,
                           effdet_detections_to_coco, to_model_input)
from trainers.validate import DataError, index_split


def _split(annotation_file, image_dir):
    return index_split(annotation_file, image_dir)[0]
from trainers.evaluate import CocoEvaluator
from trainers.model import effdet_config
from trainers.spec import ModelSpec


def test_coco_to_effdet_known_numbers():
    # x=10, y=20, w=30, h=40, resized by 0.5 -> y1,x1,y2,x2 = 10, 5, 30, 20.
    out = coco_to_effdet_boxes(np.array([[10, 20, 30, 40]], dtype=np.float32), 0.5)
    np.testing.assert_allclose(out, [[10, 5, 30, 20]])


def test_effdet_detections_to_coco_known_numbers():
    labels = LabelMap((1, 3, 7))
    rows = np.array([[[5, 10, 25, 50, 0.9, 3], [0, 0, 0, 0, 0, 0]],  # the second row is padding
                     [[1, 2, 4, 8, 0.5, 1], [0, 0, 0, 0, 0, 0]]], dtype=np.float32)
    np.testing.assert_allclose(effdet_detections_to_coco(rows, np.array([42, 43]), labels),
                               [[42, 5, 10, 20, 40, 0.9, 7], [43, 1, 2, 3, 6, 0.5, 1]], rtol=1e-6)


def test_label_map_handles_gapped_ids():
    labels = LabelMap((1, 3, 90))
    assert [labels.to_label(c) for c in (1, 3, 90)] == [1, 2, 3]
    assert [labels.to_category(l) for l in (1, 2, 3)] == [1, 3, 90]


def _write(tmp_path, images, annotations, categories=({"id": 2, "name": "a"},)):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": list(categories)}))
    return path


def test_dataset_targets_resize_pad_and_skip_crowd(tmp_path):
    from PIL import Image

    Image.new("RGB", (200, 100), (128, 128, 128)).save(tmp_path / "a.jpg")
    Image.new("RGB", (64, 64), (128, 128, 128)).save(tmp_path / "b.png")
    ann = _write(tmp_path, [
        {"id": 1, "file_name": "a.jpg", "width": 200, "height": 100},
        {"id": 2, "file_name": "b.png", "width": 64, "height": 64},  # no annotations at all
    ], [
        {"id": 1, "image_id": 1, "category_id": 2, "bbox": [20, 10, 40, 30], "iscrowd": 0, "area": 1200},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [100, 10, 40, 30], "iscrowd": 1, "area": 1200},
        {"id": 3, "image_id": 1, "category_id": 2, "bbox": [5, 5, 0.5, 10], "iscrowd": 0, "area": 5},
    ])
    split = _split(ann, tmp_path)
    data = CocoDetection(split, 128, train=False)
    assert split.trainable.tolist() == [True, False, False]  # crowd and degenerate are not trained on
    image, target = data[0]
    assert image.shape == (3, 128, 128) and image.dtype == np.uint8
    # 200x100 -> 128x64: scale 0.64. The box is y1,x1,y2,x2 in input pixels; crowd and degenerate are gone.
    np.testing.assert_allclose(target["bbox"], [[6.4, 12.8, 25.6, 38.4]], rtol=1e-5)
    assert target["cls"].tolist() == [1]
    assert target["img_scale"] == pytest.approx(1 / 0.64) and target["img_size"] == (200, 100)
    assert (image[:, 64:, :] == np.array(FILL_COLOR, dtype=np.uint8)[:, None, None]).all()  # padding below
    images, targets = Collate()([data[0], data[1]])
    assert images.shape == (2, 3, 128, 128) and images.dtype == torch.uint8
    assert (targets["cls"][1] == -1).all() and targets["cls"][0, 0] == 1
    assert to_model_input(images[:1], "cpu")[:, :, 64:, :].abs().max() < 0.02  # the fill colour normalises to ~0


def test_a_16_bit_grey_image_keeps_its_picture(tmp_path):
    """Thermal, depth and medical PNGs are 16-bit grey; Pillow's own RGB conversion turns them white. Training and
    predict read them as their top byte."""
    from PIL import Image

    from trainers.predict import read_image

    grey = np.tile(np.arange(0, 65536, 1024, dtype=np.uint16), (16, 1))  # 64 levels across, 16 rows
    Image.fromarray(grey).save(tmp_path / "deep.png")
    ann = _write(tmp_path, [{"id": 1, "file_name": "deep.png", "width": 64, "height": 16}],
                 [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [2, 2, 10, 10]}])
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode.startswith("I")  # I;16 in Pillow >= 10.3, I before
    expected = (grey >> 8).astype(np.uint8)
    for pixels in (np.asarray(CocoDetection(_split(ann, tmp_path), 64, train=False)._image(0)),
                   np.asarray(read_image(tmp_path / "deep.png"))):
        assert pixels.shape == (16, 64, 3) and (pixels == expected[:, :, None]).all()

    # Turned by its EXIF orientation (6: stored 64x16, shown 16x64, as annotated) in training as in predict.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(grey).save(tmp_path / "deep.png", exif=exif)
    ann = _write(tmp_path, [{"id": 1, "file_name": "deep.png", "width": 16, "height": 64}],
                 [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [2, 2, 10, 10]}])
    trained = np.asarray(CocoDetection(_split(ann, tmp_path), 64, train=False)._image(0))
    assert trained.shape == (64, 16, 3)
    assert (trained == np.asarray(read_image(tmp_path / "deep.png"))).all()


@pytest.mark.parametrize("values, expected", [([0, 7, 255], [0, 7, 255]), ([0, 256, 40000, 65535], [0, 1, 156, 255])])
def test_a_32_bit_grey_image_is_taken_for_16_bit_only_when_it_must_be(values, expected):
    """Pillow opens a 16-bit PGM (and before 10.3 a 16-bit PNG) as mode I; an 8-bit range stays as it is."""
    from PIL import Image

    from trainers.data import as_rgb

    img = Image.fromarray(np.array([values], dtype=np.int32))
    assert img.mode == "I" and np.asarray(as_rgb(img))[0, :, 0].tolist() == expected


def test_an_image_with_more_boxes_than_effdet_pads_to_keeps_them_all(tmp_path):
    """effdet pads a batch's targets to MAX_BOXES and drops the rest; crowd, aerial and shelf photos hold more."""
    from PIL import Image

    from trainers.annotations import TrainingData
    from trainers.data import MAX_BOXES
    from trainers.loop import TrialPlan, build_modules, data_loaders
    from trainers.recipe import TrainConfig, placement

    Image.new("RGB", (320, 320), (128, 128, 128)).save(tmp_path / "crowded.png")
    Image.new("RGB", (320, 320), (128, 128, 128)).save(tmp_path / "sparse.png")
    boxes = [{"id": n + 1, "image_id": 1, "category_id": 2, "bbox": [20 * (n % 15), 20 * (n // 15), 12, 12]}
             for n in range(MAX_BOXES + 50)]
    boxes.append({"id": 1000, "image_id": 2, "category_id": 2, "bbox": [5, 5, 40, 40]})
    split = _split(_write(tmp_path, [{"id": 1, "file_name": "crowded.png", "width": 320, "height": 320},
                                     {"id": 2, "file_name": "sparse.png", "width": 320, "height": 320}], boxes),
                   tmp_path)
    assert split.most_trainable_boxes() == MAX_BOXES + 50
    # Through the training loader that fit builds (no flip, no jitter: every box stays in the picture).
    plan = TrialPlan(ModelSpec(num_classes=1, backbone_family="efficientnet_lite", backbone_width=0.5,
                               backbone_depth=0.5, image_size=320, max_level=5, fpn_channels=32, fpn_repeats=1,
                               head_repeats=1),
                     TrainingData(split, split), TrainConfig(batch_size=2, loader_workers=0, scale_jitter=(1.0, 1.0)))
    modules = build_modules(plan, torch.device("cpu"), world_size=1)
    place = placement(plan.recipe, torch.device("cpu"))
    _, _, sampler, train_loader, _ = data_loaders(plan, modules.model, place, rank=0, world_size=1,
                                                  local_world_size=1)
    sampler.set_epoch(0)
    (_, targets), = train_loader
    assert sorted((targets["cls"] > 0).sum(dim=1).tolist()) == [1, MAX_BOXES + 50]


def _box_image(tmp_path):
    """A black 160x120 image with one white box at x 40..100, y 30..70, annotated as such."""
    from PIL import Image

    pixels = np.zeros((120, 160, 3), dtype=np.uint8)
    pixels[30:70, 40:100] = 255
    Image.fromarray(pixels).save(tmp_path / "box.png")
    return _write(tmp_path, [{"id": 1, "file_name": "box.png", "width": 160, "height": 120}],
                  [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [40, 30, 60, 40], "iscrowd": 0}])


def test_scale_jitter_moves_pixels_and_boxes_together(tmp_path):
    data = CocoDetection(_split(_box_image(tmp_path), tmp_path), 128, train=True, scale_jitter=(0.5, 1.5))
    scales, compared = set(), 0
    for epoch in range(12):
        image, target = data[(epoch, 0)]
        again, _ = data[(epoch, 0)]
        assert np.array_equal(image, again)  # the augmentation depends only on (seed, epoch, index)
        scales.add(round(target["img_scale"], 3))
        white = np.argwhere(image.min(axis=0) > 200)
        if not len(target["bbox"]):
            assert len(white) < 20  # the box was cropped away, and so were its pixels
            continue
        y1, x1, y2, x2 = target["bbox"][0]
        (py1, px1), (py2, px2) = white.min(axis=0), white.max(axis=0) + 1
        np.testing.assert_allclose([py1, px1, py2, px2], [y1, x1, y2, x2], atol=2.0)
        compared += 1
    assert len(scales) > 6  # the scale really varies from epoch to epoch
    assert compared >= 6, compared  # most epochs kept the box, so the pixels and the box were compared


def test_flip_mirrors_pixels_and_boxes(shapes):
    split = _split(shapes["train"]["annotations"], shapes["train"]["images"])
    train = CocoDetection(split, 128, train=True, scale_jitter=(1.0, 1.0))
    plain = CocoDetection(split, 128, train=False)
    flipped = 0
    for index in range(len(train)):
        (image, target), (straight, straight_target) = train[(1, index)], plain[index]
        if np.array_equal(image, straight):
            np.testing.assert_allclose(target["bbox"], straight_target["bbox"])
            continue
        flipped += 1
        assert np.array_equal(image, straight[:, :, ::-1])
        mirrored = straight_target["bbox"].copy()
        mirrored[:, [1, 3]] = 128 - straight_target["bbox"][:, [3, 1]]
        np.testing.assert_allclose(target["bbox"], mirrored, atol=1e-4)
    assert 0.25 * len(train) < flipped < 0.75 * len(train)


def test_epoch_sampler_keys_items_by_epoch():
    sampler = EpochSampler(torch.utils.data.DistributedSampler(range(8), num_replicas=2, rank=1, seed=0))
    sampler.set_epoch(3)
    keys = list(sampler)
    assert len(keys) == len(sampler) == 4 and all(epoch == 3 for epoch, _ in keys)


@pytest.mark.parametrize("swap_xy, expected", [(False, (0.99, 1.0)), (True, (0.0, 0.2))])
def test_labeler_targets_through_postprocess_score_ap_one(shapes, swap_xy, expected):
    """Anchor-labeler targets fed back as if they were network outputs must reproduce the ground truth."""
    spec = ModelSpec(num_classes=3, image_size=256, max_level=5, anchor_scale=3.0)
    config = effdet_config(spec)
    anchors = Anchors.from_config(config)
    labeler = AnchorLabeler(anchors, spec.num_classes, match_threshold=0.5)
    split = _split(shapes["val"]["annotations"], shapes["val"]["images"])
    data = CocoDetection(split, spec.image_size, train=False)
    images, targets = Collate()([data[i] for i in range(len(data))])
    bbox = targets["bbox"].clone()
    if swap_xy:
        bbox = bbox[:, :, [1, 0, 3, 2]]
    cls_targets, box_targets, _ = labeler.batch_label_anchors(bbox, targets["cls"].long())
    class_out, box_out = [], []
    for cls_t, box_t in zip(cls_targets, box_targets):
        b, h, w, a = cls_t.shape
        logits = torch.full((b, h, w, a, spec.num_classes), -20.0)
        positive = cls_t >= 0
        logits[positive, cls_t[positive]] = 20.0
        class_out.append(logits.reshape(b, h, w, -1).permute(0, 3, 1, 2))
        box_out.append(box_t.permute(0, 3, 1, 2))
    cls_pp, box_pp, indices, classes = _post_process(class_out, box_out, spec.num_levels, spec.num_classes,
                                                     config.max_detection_points)
    detections = _batch_detection(len(images), cls_pp, box_pp, anchors.boxes, indices, classes,
                                  targets["img_scale"], targets["img_size"])
    evaluator = CocoEvaluator(split.coco_ground_truth(), split.label_map)
    evaluator.process(targets["image_id"], detections.numpy())
    ap = evaluator.evaluate()["map"]
    assert expected[0] <= ap <= expected[1]


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [\n  {"id": 1,,}\n]}')
    with pytest.raises(DataError, match=r"broken.json: malformed JSON at line 2"):
        index_split(path, tmp_path)


def test_unknown_category_names_annotation(tmp_path):
    ann = _write(tmp_path, [{"id": 5, "file_name": "x.png", "width": 10, "height": 10}],
                 [{"id": 77, "image_id": 5, "category_id": 9, "bbox": [1, 1, 5, 5], "iscrowd": 0}])
    with pytest.raises(DataError, match=r"ann.json: annotation id 77 \(image id 5\): unknown category_id 9"):
        _split(ann, tmp_path)


def test_image_gone_after_the_check_names_file_and_id(tmp_path):
    from PIL import Image

    Image.new("RGB", (10, 10)).save(tmp_path / "gone.png")
    data = CocoDetection(_split(_write(tmp_path, [{"id": 6, "file_name": "gone.png", "width": 10, "height": 10}], []),
                                tmp_path), 64, train=False)
    (tmp_path / "gone.png").unlink()
    with pytest.raises(DataError, match=r"gone.png: cannot read image id 6"):
        data[0]
