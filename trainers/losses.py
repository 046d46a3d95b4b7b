"""The anchor head's loss: effdet's focal and Huber losses, torchvision's IoU losses on decoded boxes, per-box weights."""
from __future__ import annotations

import math

import torch
from effdet.anchors import Anchors, decode_box_outputs
from effdet.loss import huber_loss, new_focal_loss, one_hot
from torchvision.ops import complete_box_iou_loss, distance_box_iou_loss, generalized_box_iou_loss

from trainers.spec import ModelSpec

IOU_LOSSES = {"giou": generalized_box_iou_loss, "diou": distance_box_iou_loss, "ciou": complete_box_iou_loss}
# A prediction's log-size offset is clamped before exp(), as mmdetection's delta2bbox does: an untrained
# head's exp() of a large offset overflows to inf and the IoU loss to nan.
MAX_LOG_RATIO = abs(math.log(16 / 1000))
HUBER_DELTA = 0.1  # effdet's config.delta: about the mean regression target at 512 px


def box_iou_loss(kind: str, boxes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-box loss [N] of x1,y1,x2,y2 boxes against their targets: 1 - IoU plus the kind's penalty."""
    return IOU_LOSSES[kind](boxes, targets, reduction="none")


class AnchorLoss(torch.nn.Module):
    """Total, class and box loss of effdet's per-level outputs against BatchAnchorLabeler's targets.

    With box_loss "huber" and no weights this is effdet's DetectionLoss (tests/test_losses.py checks it).
    An IoU loss decodes both the outputs and the targets of the positive anchors with effdet's box coder, so
    it needs no other targets. Per-anchor weights (detection mixup: the blend ratio of the anchor's box)
    scale each anchor's class and box terms; the normaliser stays the count of positives, as in effdet.
    """

    def __init__(self, spec: ModelSpec, anchors: Anchors):
        super().__init__()
        self.spec = spec
        self.register_buffer("anchor_boxes", anchors.boxes.float(), persistent=False)  # [A, 4] y1, x1, y2, x2

    def forward(self, cls_outputs: list[torch.Tensor], box_outputs: list[torch.Tensor], targets: dict):
        spec, levels = self.spec, range(len(cls_outputs))
        positives = (targets["label_num_positives"].sum() + 1.0).float()  # +1: effdet's guard against 0
        weights = targets.get("label_weights")  # [B, A] or None
        cls_losses, box_terms, start = [], [], 0
        for level in levels:
            cls_target = targets[f"label_cls_{level}"]  # [B, H, W, n]: class, -1 background, -2 ignored
            box_target = targets[f"label_bbox_{level}"]  # [B, H, W, 4n]
            batch, height, width, per_location = cls_target.shape
            count = height * width * per_location
            logits = cls_outputs[level].permute(0, 2, 3, 1).float()
            loss = new_focal_loss(logits, one_hot(cls_target, spec.num_classes).view(logits.shape),
                                  alpha=spec.focal_alpha, gamma=spec.focal_gamma, normalizer=positives,
                                  label_smoothing=spec.label_smoothing)
            loss = loss.view(*cls_target.shape, spec.num_classes) * (cls_target != -2).unsqueeze(-1)
            level_weights = None if weights is None else weights[:, start:start + count].view(cls_target.shape)
            if level_weights is not None:
                loss = loss * level_weights.unsqueeze(-1)
            cls_losses.append(loss.sum())
            box_output = box_outputs[level].permute(0, 2, 3, 1).float()
            if spec.box_loss == "huber":
                mask = (box_target != 0.0).float()
                if level_weights is not None:
                    mask = mask * level_weights.repeat_interleave(4, dim=-1)
                box_terms.append(huber_loss(box_output, box_target, weights=mask, delta=HUBER_DELTA,
                                            size_average=False) / (positives * 4.0))
            else:
                box_terms.append(self._iou_loss(box_output.reshape(batch, count, 4),
                                                box_target.reshape(batch, count, 4),
                                                cls_target.reshape(batch, count) >= 0,
                                                None if level_weights is None else level_weights.reshape(batch, count),
                                                start) / positives)
            start += count
        cls_loss = torch.stack(cls_losses).sum()
        box_loss = torch.stack(box_terms).sum()
        weight = spec.box_loss_weight if spec.box_loss == "huber" else spec.iou_loss_weight
        return cls_loss + weight * box_loss, cls_loss, box_loss

    def _iou_loss(self, outputs, codes, positive, weights, start: int) -> torch.Tensor:
        """Summed IoU loss of the positive anchors of one level; outputs and codes are [B, count, 4] ty,tx,th,tw."""
        image, anchor = positive.nonzero(as_tuple=True)
        anchors = self.anchor_boxes[start + anchor]
        predicted = outputs[image, anchor]
        predicted = torch.cat([predicted[:, :2], predicted[:, 2:].clamp(max=MAX_LOG_RATIO)], dim=1)
        boxes = decode_box_outputs(predicted, anchors, output_xyxy=True)
        truth = decode_box_outputs(codes[image, anchor], anchors, output_xyxy=True)
        loss = box_iou_loss(self.spec.box_loss, boxes, truth)
        if weights is not None:
            loss = loss * weights[image, anchor]
        return loss.sum()


class AnchorTrainBench(torch.nn.Module):
    """effdet's DetBenchTrain for batches that carry their anchor labels, with AnchorLoss in place of effdet's loss."""

    def __init__(self, model: torch.nn.Module, spec: ModelSpec):
        super().__init__()
        self.model = model
        self.loss = AnchorLoss(spec, Anchors.from_config(model.config))

    def forward(self, x: torch.Tensor, target: dict) -> dict:
        class_out, box_out = self.model(x)
        loss, class_loss, box_loss = self.loss(class_out, box_out, target)
        return {"loss": loss, "class_loss": class_loss, "box_loss": box_loss}
