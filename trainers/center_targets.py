"""CenterNet training targets, written by hand because effdet, timm and torchvision have none (Zhou, Wang, Krähenbühl, "Objects as Points", 2019; Gaussian radius from Law & Deng, "CornerNet", 2018)."""
from __future__ import annotations

import torch
from effdet.anchors import get_feat_sizes

MIN_OVERLAP = 0.7  # CornerNet's and CenterNet's choice
CHUNK_ELEMENTS = 2**21  # Gaussians are drawn in chunks of boxes: 8 MB of values and 16 MB of indices each


def check_level(config, level: int) -> None:
    if not config.min_level <= level <= config.max_level:
        raise ValueError(f"level: must be a neck level in [{config.min_level}, {config.max_level}], got {level}")


def gaussian_radius(height: torch.Tensor, width: torch.Tensor, min_overlap: float = MIN_OVERLAP) -> torch.Tensor:
    """CornerNet's radius (in cells) within which a shifted box keeps IoU >= min_overlap with the true one.

    This is the form of CornerNet's and CenterNet's released code, whose quadratic roots are divided by 2
    rather than 2a: it gives larger radii than the exact roots, and it is the form their published
    results were trained with.
    """
    total, area = height + width, height * width
    r1 = (total + torch.sqrt(total**2 - 4 * area * (1 - min_overlap) / (1 + min_overlap))) / 2
    r2 = (2 * total + torch.sqrt((2 * total) ** 2 - 16 * (1 - min_overlap) * area)) / 2
    b3 = -2 * min_overlap * total
    r3 = (b3 + torch.sqrt(b3**2 - 16 * min_overlap * (min_overlap - 1) * area)) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


class CenterLabeler:
    """Batched CenterNet targets at one neck level, made in the data loader's collate.

    Keys: center_heatmap [B, C, H, W] float32 (a Gaussian per box, overlapping ones of one class take the
    max, as in CenterNet); per box [B, G]: center_index int64 (peak cell, y * W + x), center_class int64
    (0-based, -1 for padding), center_regression [B, G, 4] float32 (the regression channels' targets:
    log(h / stride), log(w / stride), offset y, offset x in cells), center_weight float32 (the box's weight,
    0 for padding) and center_valid bool.
    """

    def __init__(self, config, level: int):
        check_level(config, level)
        self.num_classes = config.num_classes
        self.stride = 2**level
        self.height, self.width = get_feat_sizes(tuple(config.image_size), config.max_level)[level]

    def __call__(self, boxes, classes, weights=None) -> dict[str, torch.Tensor]:
        boxes, classes = torch.as_tensor(boxes).float(), torch.as_tensor(classes).long()
        weights = torch.ones(classes.shape) if weights is None else torch.as_tensor(weights).float()
        y1, x1, y2, x2 = (boxes[..., i] / self.stride for i in range(4))  # in cells from here on
        valid = (classes > 0) & (y2 > y1) & (x2 > x1)
        # Padding rows may hold anything: give them a harmless one-cell box so no log or sqrt sees it.
        height = torch.where(valid, y2 - y1, 1.0)
        width = torch.where(valid, x2 - x1, 1.0)
        center_y = torch.where(valid, (y1 + y2) / 2, 0.0)
        center_x = torch.where(valid, (x1 + x2) / 2, 0.0)
        peak_y = center_y.floor().clamp(0, self.height - 1)
        peak_x = center_x.floor().clamp(0, self.width - 1)
        radius = gaussian_radius(height.ceil(), width.ceil()).floor().clamp(min=0)
        regression = torch.stack([height.log(), width.log(), center_y - peak_y, center_x - peak_x], -1)
        return {
            "center_heatmap": self._heatmap(classes, valid, peak_y, peak_x, radius),
            "center_index": torch.where(valid, peak_y * self.width + peak_x, 0).long(),
            "center_class": torch.where(valid, classes - 1, -1),
            "center_regression": regression * valid[..., None],
            "center_weight": weights * valid,
            "center_valid": valid,
        }

    def _heatmap(self, classes, valid, peak_y, peak_x, radius) -> torch.Tensor:
        batch = classes.shape[0]
        heatmap = torch.zeros(batch * self.num_classes, self.height * self.width)
        image, box = valid.nonzero(as_tuple=True)
        rows = image * self.num_classes + classes[image, box] - 1
        peak_y, peak_x, radius = peak_y[image, box], peak_x[image, box], radius[image, box]
        per_chunk = max(1, CHUNK_ELEMENTS // (self.height * self.width))
        for start in range(0, len(rows), per_chunk):
            part = slice(start, start + per_chunk)
            gaussians = _gaussians(peak_y[part], peak_x[part], radius[part], self.height, self.width)
            gaussians = gaussians.flatten(1)
            heatmap.scatter_reduce_(0, rows[part, None].expand_as(gaussians), gaussians, "amax")
        return heatmap.view(batch, self.num_classes, self.height, self.width)


def _gaussians(peak_y, peak_x, radius, height: int, width: int) -> torch.Tensor:
    """[N, H, W]: CenterNet's Gaussian (sigma = diameter / 6), cut to the (2r+1)^2 square around each peak.

    Both the Gaussian and the square factor into a row and a column term, so each is drawn as an outer product.
    """
    sigma = (2 * radius + 1) / 6

    def along(peak, size):
        distance = torch.arange(size, dtype=torch.float32) - peak[:, None]
        inside = distance.abs() <= radius[:, None]
        return torch.exp(-distance**2 / (2 * sigma[:, None] ** 2)) * inside

    return along(peak_y, height)[:, :, None] * along(peak_x, width)[:, None, :]
