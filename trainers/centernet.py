"""An anchor-free CenterNet head on effdet's backbone and BiFPN, with its loss and decoding, written by hand because effdet, timm and torchvision have none (Zhou, Wang, Krähenbühl, "Objects as Points", 2019; Gaussian radius from Law & Deng, "CornerNet", 2018)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from effdet import EfficientDet
from effdet.efficientdet import HeadNet, _init_weight
from omegaconf import OmegaConf

from trainers.center_targets import CenterLabeler, check_level, gaussian_radius

__all__ = ["CenterNet", "CenterLabeler", "CenterTrainBench", "CenterPredictBench", "center_loss", "decode",
           "gaussian_radius"]

HEATMAP_PRIOR = 0.1  # CenterNet's initial heatmap probability: bias -2.19
FOCAL_ALPHA, FOCAL_BETA = 2, 4  # CenterNet's penalty-reduced focal loss
# Regression channels: log(h / stride), log(w / stride), offset y, offset x (cells, in [0, 1)). Sizes are
# in strides and in log space because from scratch, under AdamW, a head moves its output by about lr per
# step whatever the loss scale: pixel sizes (CenterNet's choice, up to hundreds) would take thousands of
# steps to reach, whereas log strides lie in about [-1, 4] and start right for objects one stride across.
# L1 on log sizes is also an error relative to the size, as IoU is. The clamp only keeps exp() finite.
MAX_LOG_SIZE = 10.0


class CenterNet(EfficientDet):
    """effdet's backbone and neck; an anchor-free head on one neck level."""

    def __init__(self, config, level: int, pretrained_backbone: bool = False):
        check_level(config, level)
        super().__init__(config, pretrained_backbone=pretrained_backbone)
        # effdet's anchor heads would count in parameters and FLOPs though they never run.
        del self.class_net, self.box_net
        self.level, self.stride = level, 2**level
        # effdet's HeadNet towers on one level with one output per class (or box channel) per cell.
        head_config = OmegaConf.merge(config, dict(num_levels=1, num_scales=1, aspect_ratios=[[1.0, 1.0]]))
        self.heatmap_net = HeadNet(head_config, num_outputs=config.num_classes)
        self.regression_net = HeadNet(head_config, num_outputs=4)
        _init_head(self.heatmap_net, bias=-math.log((1 - HEATMAP_PRIOR) / HEATMAP_PRIOR))
        _init_head(self.regression_net, bias=0.0)

    def forward(self, x):
        features = self.fpn(self.backbone(x))[self.level - self.config.min_level]
        return self.heatmap_net([features])[0], self.regression_net([features])[0]


def _init_head(head: HeadNet, bias: float) -> None:
    # effdet's init rule for its heads is keyed on the module name; "box_net" selects it without its class prior.
    for name, module in head.named_modules(prefix="box_net"):
        _init_weight(module, name)
    [conv for conv in head.predict.modules() if isinstance(conv, torch.nn.Conv2d)][-1].bias.data.fill_(bias)


def center_loss(heatmap_logits, regression, targets: dict, *, size_weight: float = 0.1,
                offset_weight: float = 1.0):
    """(total, heatmap loss, box loss), each a sum over objects divided by their number (at least 1).

    A box's weight scales its positive heatmap term and its size and offset terms; the heatmap's negative
    cells belong to no single box and are not weighted.
    """
    logits, regression = heatmap_logits.float(), regression.float()
    valid, weight = targets["center_valid"], targets["center_weight"]
    num_objects = valid.sum().clamp(min=1)
    heatmap_loss = _focal_loss(logits, targets, weight) / num_objects
    predicted = _at_peaks(regression, targets["center_index"])
    error = (predicted - targets["center_regression"]).abs()
    size_loss = (error[..., :2].mean(-1) * weight).sum() / num_objects
    offset_loss = (error[..., 2:].mean(-1) * weight).sum() / num_objects
    box_loss = size_weight * size_loss + offset_weight * offset_loss
    return heatmap_loss + box_loss, heatmap_loss, box_loss


def _focal_loss(logits, targets: dict, weight) -> torch.Tensor:
    # Positives are read at each box's peak, so that each box's term can carry its weight.
    batch, classes, height, width = logits.shape
    cells = targets["center_class"].clamp(min=0) * (height * width) + targets["center_index"]
    peak_logits = logits.reshape(batch, -1).gather(1, cells)
    positive = (1 - peak_logits.sigmoid()) ** FOCAL_ALPHA * F.logsigmoid(peak_logits) * weight
    heatmap = targets["center_heatmap"]
    penalty = (1 - heatmap) ** FOCAL_BETA * (heatmap < 1)  # reduced near a centre by its Gaussian
    negative = penalty * logits.sigmoid() ** FOCAL_ALPHA * F.logsigmoid(-logits)
    return -(positive.sum() + negative.sum())


def _at_peaks(maps, index) -> torch.Tensor:
    """[B, C, H, W] maps read at [B, G] flat cell indices: [B, G, C]."""
    return maps.flatten(2).gather(2, index[:, None, :].expand(-1, maps.shape[1], -1)).transpose(1, 2)


def decode(heatmap_logits, regression, *, stride: int, img_scale=None, img_size=None,
           max_det: int = 100) -> torch.Tensor:
    """[B, max_det, 6] rows x1, y1, x2, y2, score, class (1-based), as effdet's DetBenchPredict returns them.

    A peak is a cell no 3x3 neighbour beats (CenterNet's stand-in for NMS); the best max_det peaks over all
    classes are kept. Boxes are scaled by img_scale (to original pixels) after being clipped to the image,
    img_size (w, h) in original pixels, as effdet does. Rows scoring 0 are padding.
    """
    scores = heatmap_logits.float().sigmoid()
    batch, classes, height, width = scores.shape
    # A peak is the cell its 3x3 window's max_pool2d points to, not any cell equal to that max: two neighbours
    # that tie (half-precision logits round to few values) would both be peaks, two boxes for one object.
    # max_pool2d points to the first maximum in row order, so of tied neighbours only the first is kept.
    _, winners = F.max_pool2d(scores, 3, stride=1, padding=1, return_indices=True)
    cells = torch.arange(height * width, device=scores.device).view(height, width)
    scores = scores * (winners == cells)
    top_scores, top = scores.flatten(1).topk(min(max_det, scores[0].numel()), dim=1)
    label, cell = top // (height * width), top % (height * width)
    log_h, log_w, offset_y, offset_x = _at_peaks(regression.float(), cell).unbind(-1)
    center_y = ((cell // width).float() + offset_y) * stride
    center_x = ((cell % width).float() + offset_x) * stride
    half_h = log_h.clamp(max=MAX_LOG_SIZE).exp() * stride / 2
    half_w = log_w.clamp(max=MAX_LOG_SIZE).exp() * stride / 2
    boxes = torch.stack([center_x - half_w, center_y - half_h, center_x + half_w, center_y + half_h], -1)
    scale = torch.ones(batch, device=boxes.device) if img_scale is None else img_scale.float()
    if img_size is not None:
        limit = (img_size.float() / scale[:, None]).repeat(1, 2)[:, None, :]
        boxes = torch.minimum(boxes.clamp(min=0), limit)
    boxes = boxes * scale[:, None, None]
    rows = torch.cat([boxes, top_scores[..., None], (label + 1).float()[..., None]], -1)
    rows = rows * (top_scores > 0)[..., None]
    return F.pad(rows, (0, 0, 0, max_det - rows.shape[1]))


class CenterTrainBench(torch.nn.Module):
    """The model plus center_loss: the training wrapper, as effdet's DetBenchTrain is for anchor heads."""

    def __init__(self, model: CenterNet, *, size_weight: float = 0.1, offset_weight: float = 1.0):
        super().__init__()
        self.model, self.config = model, model.config
        self.size_weight, self.offset_weight = size_weight, offset_weight

    def forward(self, x, target: dict) -> dict:
        total, heatmap_loss, box_loss = center_loss(*self.model(x), target, size_weight=self.size_weight,
                                                    offset_weight=self.offset_weight)
        return {"loss": total, "class_loss": heatmap_loss, "box_loss": box_loss}


class CenterPredictBench(torch.nn.Module):
    """The model plus decode(): the prediction wrapper, with effdet's DetBenchPredict contract."""

    def __init__(self, model: CenterNet, max_det: int = 100):
        super().__init__()
        self.model, self.config, self.max_det = model, model.config, max_det

    def forward(self, x, img_info: dict | None = None) -> torch.Tensor:
        img_info = img_info or {}
        return decode(*self.model(x), stride=self.model.stride, img_scale=img_info.get("img_scale"),
                      img_size=img_info.get("img_size"), max_det=self.max_det)
