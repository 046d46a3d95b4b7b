"""The batched anchor labeler gives effdet's AnchorLabeler's targets, image by image."""
import pytest
import torch
from effdet.anchors import AnchorLabeler, Anchors

from trainers.anchors import BatchAnchorLabeler
from trainers.model import effdet_config
from trainers.spec import ModelSpec


def _random_batch(generator, batch: int, image_size: int, max_boxes: int = 12, pad_to: int = 100):
    boxes = torch.full((batch, pad_to, 4), -1.0)
    classes = torch.full((batch, pad_to), -1.0)
    for b in range(batch):
        count = int(torch.randint(0, max_boxes + 1, (1,), generator=generator))  # some images have no boxes
        corner = torch.rand(count, 2, generator=generator) * image_size * 0.9
        size = 2 + torch.rand(count, 2, generator=generator) * image_size * 0.5
        boxes[b, :count] = torch.cat([corner, (corner + size).clamp(max=image_size)], 1)
        classes[b, :count] = torch.randint(1, 4, (count,), generator=generator).float()
    return boxes, classes


@pytest.mark.parametrize("image_size, max_level, anchor_scale", [(128, 5, 1.5), (192, 5, 2.25), (256, 7, 4.0)])
def test_batch_labels_equal_effdet_labels(image_size, max_level, anchor_scale):
    spec = ModelSpec(num_classes=3, image_size=image_size, max_level=max_level, anchor_scale=anchor_scale)
    anchors = Anchors.from_config(effdet_config(spec))
    ours = BatchAnchorLabeler(anchors, spec.num_classes)
    effdets = AnchorLabeler(anchors, spec.num_classes, match_threshold=0.5)
    generator = torch.Generator().manual_seed(image_size)
    boxes, classes = _random_batch(generator, 16, image_size)
    labels = ours(boxes, classes)
    cls_targets, box_targets, positives = effdets.batch_label_anchors(boxes, classes)
    assert labels["label_num_positives"].tolist() == [float(p) for p in positives]
    assert labels["label_num_positives"].sum() > 16  # the batch really has matches
    for level in range(spec.num_levels):
        assert torch.equal(labels[f"label_cls_{level}"], torch.stack(cls_targets[level]) if isinstance(
            cls_targets[level], list) else cls_targets[level])
        expected = torch.stack(box_targets[level]) if isinstance(box_targets[level], list) else box_targets[level]
        torch.testing.assert_close(labels[f"label_bbox_{level}"], expected, rtol=1e-5, atol=1e-5)


def test_chunked_labelling_equals_one_pass(monkeypatch):
    spec = ModelSpec(num_classes=3, image_size=128, max_level=5, anchor_scale=1.5)
    labeler = BatchAnchorLabeler(Anchors.from_config(effdet_config(spec)), spec.num_classes)
    boxes, classes = _random_batch(torch.Generator().manual_seed(0), 8, 128)
    whole = labeler(boxes, classes)
    monkeypatch.setattr("trainers.anchors.CHUNK_ELEMENTS", 1)  # one image per chunk
    for key, value in labeler(boxes, classes).items():
        assert torch.equal(value, whole[key]), key
