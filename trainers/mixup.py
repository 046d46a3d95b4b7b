"""Detection mixup (Zhang et al., "Bag of Freebies for Training Object Detection Neural Networks", 2019), on a
collated batch; written by hand: timm's Mixup mixes class labels, not boxes, and effdet has none.

An image is blended with another image of its batch, pixel by pixel at one ratio λ ~ Beta(α, α), keeping
both images' geometry (they are letterboxed to one canvas already). Its boxes become the union of both
images' boxes, and each box carries the blend ratio of the image it came from as a weight on its loss terms
(the paper's "weighted loss"): a box from an image blended at 0.3 counts 0.3 of a box.
"""
from __future__ import annotations

import numpy as np
import torch


def mix_batch(images: torch.Tensor, boxes: torch.Tensor, classes: torch.Tensor, *, prob: float, alpha: float,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """images uint8 [B, 3, H, W]; boxes [B, G, 4]; classes [B, G] padded with -1.

    Each image is mixed with probability `prob`, with another image of the batch drawn at random. Returns
    the images, boxes [B, 2G, 4] and classes [B, 2G] (own boxes first, then the partner's, padded with -1),
    and weights [B, 2G]: λ for the own boxes, 1 - λ for the partner's (1 and 0 for an unmixed image).
    """
    batch = len(images)
    mixed = rng.random(batch) < prob if batch > 1 else np.zeros(batch, dtype=bool)
    # A partner other than the image itself: a random shift of its index, never 0.
    partners = (np.arange(batch) + rng.integers(1, max(batch, 2), size=batch)) % batch
    ratios = np.where(mixed, rng.beta(alpha, alpha, size=batch), 1.0)
    ratio = torch.from_numpy(ratios).float()
    partner = torch.from_numpy(partners)
    pixels = images.float() * ratio.view(-1, 1, 1, 1) + images[partner].float() * (1 - ratio).view(-1, 1, 1, 1)
    partner_classes = torch.where(torch.from_numpy(mixed)[:, None], classes[partner], torch.full_like(classes, -1))
    weights = torch.cat([ratio[:, None].expand_as(classes), (1 - ratio)[:, None].expand_as(classes)], dim=1)
    return (pixels.round_().clamp_(0, 255).to(torch.uint8), torch.cat([boxes, boxes[partner]], dim=1),
            torch.cat([classes, partner_classes], dim=1), weights.contiguous())
