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
# head's exp() of a large offset overflows to inf and the IoU loss to nan; a very negative one gives a box of
# no height, and CIoU's atan(w / h) is then nan.
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
        cls_losses, huber_terms, iou_parts, start = [], [], [], 0
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
                huber_terms.append(huber_loss(box_output, box_target, weights=mask, delta=HUBER_DELTA,
                                            size_average=False) / (positives * 4.0))
            else:
                iou_parts.append((box_output.reshape(batch, count, 4), box_target.reshape(batch, count, 4),
                                  cls_target.reshape(batch, count) >= 0))
            start += count
        cls_loss = torch.stack(cls_losses).sum()
        if huber_terms:
            box_loss = torch.stack(huber_terms).sum()
        else:  # every level at once: [B, A, 4] outputs and codes, [B, A] positives, in the anchors' order
            outputs, codes, positive = (torch.cat(parts, dim=1) for parts in zip(*iou_parts))
            box_loss = self._iou_loss(outputs, codes, positive, weights) / positives
        weight = spec.box_loss_weight if spec.box_loss == "huber" else spec.iou_loss_weight
        return cls_loss + weight * box_loss, cls_loss, box_loss

    def _iou_loss(self, outputs, codes, positive, weights) -> torch.Tensor:
        """Summed IoU loss of the positive anchors; outputs and codes are [B, A, 4] ty,tx,th,tw.

        Computed for every anchor and masked, rather than gathered at the positives: the gather's nonzero()
        would wait for the GPU at every step. A code outside the positives is made 0, which decodes to the
        anchor itself, and the predicted sizes are clamped on both sides, so every masked term is finite and
        its gradient 0.
        """
        batch = outputs.shape[0]
        anchors = self.anchor_boxes.expand(batch, -1, -1).reshape(-1, 4)
        sizes = outputs[..., 2:].clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        predicted = torch.cat([outputs[..., :2], sizes], dim=-1).reshape(-1, 4)
        codes = torch.where(positive.unsqueeze(-1), codes, 0.0).reshape(-1, 4)
        boxes = decode_box_outputs(predicted, anchors, output_xyxy=True)
        truth = decode_box_outputs(codes, anchors, output_xyxy=True)
        loss = torch.where(positive.reshape(-1), box_iou_loss(self.spec.box_loss, boxes, truth), 0.0)
        if weights is not None:
            loss = loss * weights.reshape(-1)
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
