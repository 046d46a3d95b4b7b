"""The one COCO <-> effdet box conversion, the dataset's targets, and a labeler round trip scoring AP 1.0."""
import json

import numpy as np
import pytest
import torch
from effdet.anchors import AnchorLabeler, Anchors
from effdet.bench import _batch_detection, _post_process

from trainers.data import (CocoDetection, DataError, LabelMap, coco_to_effdet_boxes, collate,
                           effdet_detections_to_coco, load_coco)
from trainers.evaluate import CocoEvaluator
from trainers.model import effdet_config
from trainers.spec import ModelSpec


def test_coco_to_effdet_known_numbers():
    # x=10, y=20, w=30, h=40, resized by 0.5 -> y1,x1,y2,x2 = 10, 5, 30, 20.
    out = coco_to_effdet_boxes(np.array([[10, 20, 30, 40]], dtype=np.float32), 0.5)
    np.testing.assert_allclose(out, [[10, 5, 30, 20]])


def test_effdet_detections_to_coco_known_numbers():
    labels = LabelMap((1, 3, 7))
    rows = np.array([[5, 10, 25, 50, 0.9, 3], [0, 0, 0, 0, 0, 0]], dtype=np.float32)  # second row is padding
    assert effdet_detections_to_coco(rows, 42, labels) == [
        {"image_id": 42, "category_id": 7, "bbox": [5.0, 10.0, 20.0, 40.0], "score": pytest.approx(0.9)}]


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
    data = CocoDetection(ann, tmp_path, 128, train=False)
    assert data.dropped_boxes == 1
    image, target = data[0]
    assert image.shape == (3, 128, 128)
    # 200x100 -> 128x64: scale 0.64. The box is y1,x1,y2,x2 in input pixels; crowd and degenerate are gone.
    np.testing.assert_allclose(target["bbox"][0].numpy(), [6.4, 12.8, 25.6, 38.4], rtol=1e-5)
    assert target["cls"][0] == 1 and (target["cls"][1:] == -1).all()
    assert target["img_scale"].item() == pytest.approx(1 / 0.64)
    assert target["img_size"].tolist() == [200, 100]
    images, targets = collate([data[0], data[1]])
    assert images.shape == (2, 3, 128, 128) and (targets["cls"][1] == -1).all()


def test_flip_mirrors_boxes(shapes):
    data = CocoDetection(shapes["train"]["annotations"], shapes["train"]["images"], 128, train=True)
    plain = CocoDetection(shapes["train"]["annotations"], shapes["train"]["images"], 128, train=False)
    for i in range(len(data)):
        if data._flip(i) and (plain[i][1]["cls"] > 0).any():
            flipped, straight = data[i][1]["bbox"][0], plain[i][1]["bbox"][0]
            assert flipped[0] == straight[0] and flipped[2] == straight[2]
            assert flipped[1] == pytest.approx(128 - straight[3]) and flipped[3] == pytest.approx(128 - straight[1])
            return
    pytest.fail("no flipped image with a box in the sample")


@pytest.mark.parametrize("swap_xy, expected", [(False, (0.99, 1.0)), (True, (0.0, 0.2))])
def test_labeler_targets_through_postprocess_score_ap_one(shapes, swap_xy, expected):
    """Anchor-labeler targets fed back as if they were network outputs must reproduce the ground truth."""
    spec = ModelSpec(num_classes=3, image_size=256, max_level=5, anchor_scale=3.0)
    config = effdet_config(spec)
    anchors = Anchors.from_config(config)
    labeler = AnchorLabeler(anchors, spec.num_classes, match_threshold=0.5)
    data = CocoDetection(shapes["val"]["annotations"], shapes["val"]["images"], spec.image_size, train=False)
    images, targets = collate([data[i] for i in range(len(data))])
    bbox = targets["bbox"].clone()
    if swap_xy:
        bbox = bbox[:, :, [1, 0, 3, 2]]
    cls_targets, box_targets, _ = labeler.batch_label_anchors(bbox, targets["cls"])
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
    evaluator = CocoEvaluator(data.coco, data.labels)
    evaluator.process(targets["image_id"], detections.numpy())
    ap = evaluator.evaluate()["map"]
    assert expected[0] <= ap <= expected[1]


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [\n  {"id": 1,,}\n]}')
    with pytest.raises(DataError, match=r"broken.json: malformed JSON at line 2"):
        load_coco(path)


def test_unknown_category_names_annotation(tmp_path):
    ann = _write(tmp_path, [{"id": 5, "file_name": "x.png", "width": 10, "height": 10}],
                 [{"id": 77, "image_id": 5, "category_id": 9, "bbox": [1, 1, 5, 5], "iscrowd": 0}])
    with pytest.raises(DataError, match=r"ann.json: annotation id 77 \(image id 5\): unknown category_id 9"):
        CocoDetection(ann, tmp_path, 64, train=False)


def test_box_outside_image_names_annotation(tmp_path):
    ann = _write(tmp_path, [{"id": 5, "file_name": "x.png", "width": 10, "height": 10}],
                 [{"id": 78, "image_id": 5, "category_id": 2, "bbox": [4, 4, 20, 5], "iscrowd": 0}])
    with pytest.raises(DataError, match=r"annotation id 78 \(image id 5\): box .* outside the 10x10 image"):
        CocoDetection(ann, tmp_path, 64, train=False)


def test_missing_image_names_file_and_id(tmp_path):
    ann = _write(tmp_path, [{"id": 6, "file_name": "nope.png", "width": 10, "height": 10}], [])
    data = CocoDetection(ann, tmp_path, 64, train=False)
    with pytest.raises(DataError, match=r"nope.png: cannot read image id 6"):
        data[0]
