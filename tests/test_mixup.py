"""Detection mixup: blended pixels, the union of both images' boxes, and each box weighted by its image's ratio."""
import numpy as np
import pytest
import torch

from trainers.data import Collate
from trainers.mixup import mix_batch


def _batch():
    images = torch.stack([torch.full((3, 8, 8), 100, dtype=torch.uint8), torch.full((3, 8, 8), 200, dtype=torch.uint8)])
    boxes = torch.full((2, 3, 4), -1.0)
    classes = torch.full((2, 3), -1.0)
    boxes[0, :2] = torch.tensor([[0.0, 0, 4, 4], [1, 1, 5, 6]])
    classes[0, :2] = torch.tensor([1.0, 2.0])
    boxes[1, :1] = torch.tensor([[2.0, 3, 7, 8]])
    classes[1, :1] = torch.tensor([3.0])
    return images, boxes, classes


def test_a_mixed_pair_blends_pixels_at_the_ratio_its_boxes_carry():
    images, boxes, classes = _batch()
    mixed, out_boxes, out_classes, weights = mix_batch(images, boxes, classes, prob=1.0, alpha=1.5,
                                                       rng=np.random.default_rng(0))
    own = weights[:, 0]
    assert ((own > 0) & (own < 1)).all()
    # Image 0 is 100 everywhere and image 1 is 200: each is blended with the other at its own ratio.
    expected = torch.stack([100 * own[0] + 200 * (1 - own[0]), 200 * own[1] + 100 * (1 - own[1])])
    assert torch.equal(mixed[:, 0, 0, 0], expected.round().to(torch.uint8))
    assert (mixed == mixed[:, :1, :1, :1]).all()  # every pixel of an image blended alike
    # The union of boxes: own first, then the partner's, each with the weight of the image it came from.
    assert out_boxes.shape == (2, 6, 4)
    assert torch.equal(out_boxes[0, :3], boxes[0]) and torch.equal(out_boxes[0, 3:], boxes[1])
    assert torch.equal(out_boxes[1, :3], boxes[1]) and torch.equal(out_boxes[1, 3:], boxes[0])
    assert out_classes[0].tolist() == [1, 2, -1, 3, -1, -1]
    assert out_classes[1].tolist() == [3, -1, -1, 1, 2, -1]
    assert torch.allclose(weights[0], torch.tensor([own[0]] * 3 + [1 - own[0]] * 3))
    assert torch.allclose(weights[1], torch.tensor([own[1]] * 3 + [1 - own[1]] * 3))


def test_an_unmixed_image_keeps_its_pixels_and_boxes_at_weight_one():
    images, boxes, classes = _batch()
    mixed, out_boxes, out_classes, weights = mix_batch(images, boxes, classes, prob=0.0, alpha=1.5,
                                                       rng=np.random.default_rng(0))
    assert torch.equal(mixed, images)
    assert torch.equal(out_classes[:, :3], classes) and (out_classes[:, 3:] == -1).all()
    assert (weights[:, :3] == 1).all()
    single = mix_batch(images[:1], boxes[:1], classes[:1], prob=1.0, alpha=1.5, rng=np.random.default_rng(0))
    assert torch.equal(single[0], images[:1])  # no partner in a batch of one


def test_the_share_mixed_and_the_ratios_follow_prob_and_beta_alpha():
    images = torch.zeros(4000, 1, 1, 1, dtype=torch.uint8)
    boxes, classes = torch.zeros(4000, 1, 4), torch.ones(4000, 1)
    _, _, _, weights = mix_batch(images, boxes, classes, prob=0.5, alpha=1.5, rng=np.random.default_rng(1))
    ratio = weights[:, 0]
    mixed = ratio < 1
    assert mixed.float().mean().item() == pytest.approx(0.5, abs=0.03)
    # Beta(1.5, 1.5): mean 1/2, variance 1 / (4 * (2 * 1.5 + 1)) = 1/16.
    assert ratio[mixed].mean().item() == pytest.approx(0.5, abs=0.02)
    assert ratio[mixed].var().item() == pytest.approx(1 / 16, abs=0.006)


def test_the_collate_mixes_the_same_way_for_the_same_epoch_and_images():
    def item(value, image_id, epoch):
        return (np.full((3, 8, 8), value, dtype=np.uint8),
                {"bbox": np.array([[0, 0, 4, 4]], dtype=np.float32), "cls": np.array([1]), "img_size": (8, 8),
                 "img_scale": 1.0, "image_id": image_id, "epoch": epoch})

    collate = Collate(mixup_prob=1.0, seed=0)
    first = collate([item(100, 7, 1), item(200, 9, 1)])
    again = collate([item(100, 7, 1), item(200, 9, 1)])
    other_epoch = collate([item(100, 7, 2), item(200, 9, 2)])
    assert torch.equal(first[0], again[0])
    assert not torch.equal(first[0], other_epoch[0])
    assert first[1]["cls"].shape == (2, 200)  # both images' boxes, padded to MAX_BOXES each
