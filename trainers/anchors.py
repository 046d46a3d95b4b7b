"""Anchor labelling for a whole batch at once, with effdet's AnchorLabeler rules.

effdet labels one image at a time: about forty small tensor operations per image, which on a CPU-only
trainer cost as much as 4% of a training step (26 ms per batch of 16 at 192 px). The same rules run here as
one set of operations over the padded batch, and tests check the result equals effdet's, image by image.
The rules (effdet's ArgMaxMatcher, IouSimilarity and FasterRcnnBoxCoder, as its AnchorLabeler sets them up):
an anchor takes the box it overlaps most if that IoU reaches the match threshold; below the unmatched
threshold it is background, and in between ignored (effdet's default sets both to 0.5; effdet's own labeler
gives ignored anchors the background class, where here they get -2, which its loss masks out, as in the
TensorFlow original and RetinaNet's 0.4-0.5 band); each box also claims
the anchor it overlaps most; box targets are [ty, tx, th, tw] against the anchor; classes become 0-based, -1
for background, -2 ignored. The "atss" assigner replaces the thresholds with trainers/atss.py's rule.
"""
from __future__ import annotations

import torch
from effdet.anchors import Anchors

from trainers.atss import atss_matches

BOX_CODER_EPS = 1e-7  # effdet.object_detection.box_coder.EPS
CHUNK_ELEMENTS = 2**24  # images are labelled in chunks so the IoU matrix stays under 64 MB


class BatchAnchorLabeler:
    def __init__(self, anchors: Anchors, num_classes: int, match_threshold: float = 0.5,
                 unmatched_threshold: float | None = None, assigner: str = "iou", atss_topk: int = 9):
        self.boxes = anchors.boxes.float()  # [A, 4] y1, x1, y2, x2
        self.num_classes = num_classes
        self.match_threshold = match_threshold
        self.unmatched_threshold = match_threshold if unmatched_threshold is None else unmatched_threshold
        self.assigner, self.atss_topk = assigner, atss_topk
        self.level_shapes = [(*anchors.feat_sizes[level], anchors.get_anchors_per_location())
                             for level in range(anchors.min_level, anchors.max_level + 1)]
        self.level_spans, start = [], 0  # (first anchor, anchor count, anchors per location) per level
        for height, width, per_location in self.level_shapes:
            self.level_spans.append((start, height * width * per_location, per_location))
            start += height * width * per_location
        y1, x1, y2, x2 = self.boxes.unbind(1)
        self.anchor_area = (y2 - y1) * (x2 - x1)
        height, width = y2 - y1, x2 - x1
        self.anchor_center = torch.stack([y1 + height / 2, x1 + width / 2], 1)
        self.anchor_size = torch.stack([height + BOX_CODER_EPS, width + BOX_CODER_EPS], 1)

    def __call__(self, boxes: torch.Tensor, classes: torch.Tensor,
                 weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """boxes [B, G, 4] y1,x1,y2,x2 and classes [B, G] (1-based), padded with class -1; weights [B, G] per
        box (detection mixup's blend ratios) or None.

        Returns effdet's label keys: label_cls_L [B, H, W, n], label_bbox_L [B, H, W, 4n], label_num_positives
        [B]; with weights also label_weights [B, A]: each positive anchor's box weight, 1 elsewhere.
        """
        classes = classes.long()
        valid = classes > -1
        kept = int(valid.sum(1).max()) if valid.numel() else 0
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :max(kept, 1)]  # valid boxes first
        boxes, classes, valid = boxes.gather(1, order[..., None].expand(-1, -1, 4)), classes.gather(1, order), \
            valid.gather(1, order)
        box_weights = torch.ones_like(boxes[..., 0]) if weights is None else weights.float().gather(1, order)
        per_chunk = max(1, CHUNK_ELEMENTS // (boxes.shape[1] * len(self.boxes)))
        parts = [self._label(boxes[i:i + per_chunk], classes[i:i + per_chunk], valid[i:i + per_chunk],
                             box_weights[i:i + per_chunk])
                 for i in range(0, len(boxes), per_chunk)]
        cls_targets, box_targets, positives, anchor_weights = (torch.cat(part) for part in zip(*parts))
        out = {"label_num_positives": positives}
        if weights is not None:
            out["label_weights"] = anchor_weights
        start = 0
        for level, (height, width, per_location) in enumerate(self.level_shapes):
            end = start + height * width * per_location
            out[f"label_cls_{level}"] = cls_targets[:, start:end].reshape(len(boxes), height, width, -1)
            out[f"label_bbox_{level}"] = box_targets[:, start:end].reshape(len(boxes), height, width, -1)
            start = end
        return out

    def _label(self, boxes, classes, valid, box_weights):
        # Padding boxes become empty boxes far outside the image: IoU 0 with every anchor. They sort after
        # the real boxes, so they never win a tie either.
        boxes = torch.where(valid[..., None], boxes, torch.full_like(boxes, -1e6))
        iou = self._iou(boxes)  # [B, G, A]
        if self.assigner == "atss":
            matches = atss_matches(iou, boxes, valid, self.anchor_center, self.level_spans, self.atss_topk)
            ignored = torch.zeros_like(matches, dtype=torch.bool)
        else:
            matches, ignored = self._threshold_matches(iou, valid)

        # Targets are computed for the matched anchors only: a few hundred of the batch's ~10^5.
        image, anchor = (matches > -1).nonzero(as_tuple=True)
        box = matches[image, anchor]
        cls_targets = torch.full_like(matches, -1).masked_fill(ignored, -2)
        cls_targets[image, anchor] = classes[image, box] - 1
        anchor_weights = torch.ones_like(matches, dtype=torch.float32)
        anchor_weights[image, anchor] = box_weights[image, box]
        gt = boxes[image, box]  # [P, 4]
        gt_size = torch.stack([gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]], 1)
        offsets = (gt[:, :2] + gt_size / 2 - self.anchor_center[anchor]) / self.anchor_size[anchor]  # ty, tx
        scales = torch.log((gt_size + BOX_CODER_EPS) / self.anchor_size[anchor])  # th, tw
        box_targets = boxes.new_zeros(*matches.shape, 4)
        box_targets[image, anchor] = torch.cat([offsets, scales], 1)
        return cls_targets, box_targets, (matches > -1).float().sum(1), anchor_weights

    def _threshold_matches(self, iou, valid):
        """effdet's ArgMaxMatcher: [B, A] box index or -1, and the anchors in the ignore band."""
        best_iou, matches = iou.max(dim=1)  # per anchor: its best box
        ignored = (best_iou >= self.unmatched_threshold) & (best_iou < self.match_threshold)
        matches = matches.masked_fill(best_iou < self.match_threshold, -1)
        # Every box also claims the anchor it overlaps most, threshold or not; of two boxes claiming one
        # anchor the first wins, as in effdet's ArgMaxMatcher.
        best_anchor = iou.argmax(dim=2)  # [B, G]
        box_index = torch.arange(iou.shape[1]).expand_as(best_anchor)
        unclaimed = iou.shape[1]
        claimant = torch.full_like(matches, unclaimed).scatter_reduce(
            1, best_anchor, box_index.masked_fill(~valid, unclaimed), reduce="amin")
        matches = torch.where(claimant < unclaimed, claimant, matches)
        return matches, ignored & (matches < 0)

    def _iou(self, boxes: torch.Tensor) -> torch.Tensor:
        anchors = self.boxes
        height = (torch.minimum(boxes[..., 2, None], anchors[:, 2]) - torch.maximum(boxes[..., 0, None], anchors[:, 0]))
        width = (torch.minimum(boxes[..., 3, None], anchors[:, 3]) - torch.maximum(boxes[..., 1, None], anchors[:, 1]))
        inter = height.clamp_(min=0).mul_(width.clamp_(min=0))
        area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
        # Anchors have positive area, so the union is never zero.
        return inter.div_((area[..., None] + self.anchor_area).sub_(inter))
